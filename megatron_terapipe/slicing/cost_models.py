"""Stage cost models: how long one pipeline stage takes for one (batch, token-slice, context) unit.

Every model answers the same two questions, so the planner, the CLI and the schedule simulator
can take any of them:

- `forward_backward_time(batch, slice_len, context_len)`: seconds for the forward plus backward
  of one stage (its share of the layers) on `batch` sequences of `slice_len` tokens that attend
  to `context_len` earlier tokens;
- `p2p_time(batch, slice_len)`: seconds to send that slice's activations to the next stage.

`AnalyticCostModel` derives both from FLOPs and bytes, so it needs no hardware; the measured
models live in `profiled.py` and `latency_table.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from megatron_terapipe.token_slices import granularity_problem


@runtime_checkable
class StageCostModel(Protocol):
    """The interface shared by the planner and the simulator (times in seconds)."""

    name: str

    def forward_backward_time(self, batch: int, slice_len: int, context_len: int) -> float: ...

    def p2p_time(self, batch: int, slice_len: int) -> float: ...


@dataclass(frozen=True)
class DevicePreset:
    """Rates of one accelerator and its links; ballpark data-sheet numbers, not measurements.

    `overhead_s` is a fixed cost per layer per forward+backward (kernel launches, small ops):
    it is what makes very thin slices lose, next to the weight-read floor `mem_bandwidth_gbps`.
    """

    peak_tflops: float
    efficiency: float
    mem_bandwidth_gbps: float
    link_bandwidth_gbps: float
    link_latency_s: float
    tp_bandwidth_gbps: float
    overhead_s: float


DEVICE_PRESETS: dict[str, DevicePreset] = {
    # V100 SXM2: 125 TFLOP/s fp16 tensor cores, 900 GB/s HBM2, NVLink within a p3.16xlarge,
    # 25 Gbit/s Ethernet between nodes (the TeraPipe paper's cluster).
    "v100": DevicePreset(125.0, 0.45, 900.0, 3.125, 30e-6, 130.0, 40e-6),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, 2 TB/s HBM2e, 200 Gbit/s InfiniBand per GPU.
    "a100": DevicePreset(312.0, 0.5, 2039.0, 25.0, 10e-6, 250.0, 30e-6),
    # H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 400 Gbit/s InfiniBand per GPU.
    "h100": DevicePreset(989.0, 0.5, 3350.0, 50.0, 8e-6, 450.0, 25e-6),
    # A few server CPU cores in fp32 with gloo over loopback: good enough to plan the CPU demo.
    "cpu": DevicePreset(0.2, 0.5, 20.0, 2.0, 50e-6, 2.0, 200e-6),
}


@dataclass
class AnalyticCostModel:
    """FLOP/byte model of one stage of a Megatron GPT layer stack (fp16/bf16 training).

    Per layer and per forward pass, with h hidden, a heads, g query groups, d = h/a, f FFN
    hidden, t tensor-parallel ranks, for b sequences of l tokens after c tokens of context:
      linear FLOPs    2·b·l·(h·(h + 2·g·d) + h·h + k·h·f) / t     (QKV, proj, MLP; k=2, or 3 gated)
      attention FLOPs 4·b·a·d·l·(c + l) / t                       (scores and values; the local
                                                                   kernel computes the masked
                                                                   square too)
    Backward is twice forward. Compute time is FLOPs / (peak · efficiency), floored by reading
    the layer's weights three times (forward, data-grad, weight-grad) at memory bandwidth, plus
    a fixed per-layer overhead and, with t > 1, the four ring all-reduces of b·l·h activations.
    P2P is link latency plus the slice's activations (b·l·h elements; a 1/t shard each under
    sequence parallelism) over the link bandwidth. Embedding and LM head are not counted: the
    model prices the transformer layers that every stage has.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    gated_linear_unit: bool = False
    peak_tflops: float = DEVICE_PRESETS["v100"].peak_tflops
    efficiency: float = DEVICE_PRESETS["v100"].efficiency
    mem_bandwidth_gbps: float = DEVICE_PRESETS["v100"].mem_bandwidth_gbps
    link_bandwidth_gbps: float = DEVICE_PRESETS["v100"].link_bandwidth_gbps
    link_latency_s: float = DEVICE_PRESETS["v100"].link_latency_s
    tp_bandwidth_gbps: float = DEVICE_PRESETS["v100"].tp_bandwidth_gbps
    overhead_s: float = DEVICE_PRESETS["v100"].overhead_s
    bytes_per_element: int = 2
    preset: str = "v100"

    supports_arrays = True

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"AnalyticCostModel.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for name in ("peak_tflops", "efficiency", "mem_bandwidth_gbps", "link_bandwidth_gbps",
                     "tp_bandwidth_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AnalyticCostModel.{name} must be > 0, got {getattr(self, name)}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **dims: Any) -> AnalyticCostModel:
        """Model dims plus a named device ('v100', 'a100', 'h100', 'cpu'); keywords also
        override the device's rates."""
        if preset not in DEVICE_PRESETS:
            raise ValueError(
                f"unknown device preset {preset!r}; valid: {', '.join(sorted(DEVICE_PRESETS))}"
            )
        rates = DEVICE_PRESETS[preset]
        return cls(**{**vars(rates), **dims}, preset=preset)

    @classmethod
    def from_args(cls, args: Any, preset: str | None = None) -> AnalyticCostModel:
        """From a Megatron argument namespace; the device is guessed when `preset` is None."""
        dims = {
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads,
            "num_query_groups": getattr(args, "num_query_groups", None)
            if getattr(args, "group_query_attention", True)
            else None,
            "ffn_hidden_size": getattr(args, "ffn_hidden_size", None),
            "tensor_model_parallel_size": getattr(args, "tensor_model_parallel_size", 1) or 1,
            "pipeline_model_parallel_size": getattr(args, "pipeline_model_parallel_size", 1) or 1,
            "sequence_parallel": bool(getattr(args, "sequence_parallel", False)),
            "gated_linear_unit": bool(getattr(args, "swiglu", False)),
        }
        return cls.from_preset(preset or detect_device_preset(), **dims)

    def with_rates(self, **rates: Any) -> AnalyticCostModel:
        return replace(self, **rates)

    # -- the interface -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"analytic:{self.preset}"

    @property
    def layers_per_stage(self) -> float:
        """Uneven splits price the heaviest stage: it sets the pipeline's pace."""
        return math.ceil(self.num_layers / self.pipeline_model_parallel_size)

    @property
    def params_per_layer(self) -> float:
        h, d = self.hidden_size, self.hidden_size // self.num_attention_heads
        mlp = (3 if self.gated_linear_unit else 2) * h * self.ffn_hidden_size
        return h * (h + 2 * self.num_query_groups * d) + h * h + mlp

    def forward_flops(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        """FLOPs of one layer's forward on one TP rank; works on numpy arrays."""
        b, n, c = (np.asarray(x, dtype=np.float64) for x in (batch, slice_len, context_len))
        t = self.tensor_model_parallel_size
        linear = 2.0 * b * n * self.params_per_layer
        attention = 4.0 * b * self.hidden_size * n * (c + n)
        return (linear + attention) / t

    def weight_grad_fraction(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        """The weight-gradient GEMMs' share of one layer's backward (what a split backward's W
        runs): the backward does twice the forward's FLOPs, of which the weight gradients are
        the linear layers' forward FLOPs again; attention has no weights."""
        b, n, c = (np.asarray(x, dtype=np.float64) for x in (batch, slice_len, context_len))
        linear = 2.0 * b * n * self.params_per_layer
        attention = 4.0 * b * self.hidden_size * n * (c + n)
        return linear / (2.0 * (linear + attention))

    def forward_backward_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        b = np.asarray(batch, dtype=np.float64)
        n = np.asarray(slice_len, dtype=np.float64)
        t = self.tensor_model_parallel_size
        compute = 3.0 * self.forward_flops(b, n, context_len) / (
            self.peak_tflops * 1e12 * self.efficiency
        )
        weights = 3.0 * self.params_per_layer * self.bytes_per_element / t / (
            self.mem_bandwidth_gbps * 1e9
        )
        per_layer = np.maximum(compute, weights) + self.overhead_s
        if t > 1:
            ring = 2.0 * (t - 1) / t * b * n * self.hidden_size * self.bytes_per_element
            per_layer = per_layer + 4.0 * ring / (self.tp_bandwidth_gbps * 1e9)
        out = per_layer * self.layers_per_stage
        return float(out) if np.ndim(out) == 0 else out

    def p2p_time(self, batch: Any, slice_len: Any) -> Any:
        shard = self.tensor_model_parallel_size if self.sequence_parallel else 1
        nbytes = (
            np.asarray(batch, dtype=np.float64)
            * np.asarray(slice_len, dtype=np.float64)
            * self.hidden_size
            * self.bytes_per_element
            / shard
        )
        out = self.link_latency_s + nbytes / (self.link_bandwidth_gbps * 1e9)
        return float(out) if np.ndim(out) == 0 else out


def detect_device_preset() -> str:
    """Best guess of the preset for the current machine; 'cpu' without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        gpu = torch.cuda.get_device_name().upper()
    except Exception:  # noqa: BLE001 - no torch or a broken driver: plan as if on CPU
        return "cpu"
    for key in ("H100", "H200", "H800", "GH200"):
        if key in gpu:
            return "h100"
    if "A100" in gpu or "A800" in gpu:
        return "a100"
    return "v100"


def build_latency_table(
    model: StageCostModel,
    max_batch: int,
    seq_length: int,
    granularity: int = 1,
    include_p2p: bool = True,
) -> np.ndarray:
    """The planner's view of a cost model: `table[b, l, c]` (docs/latency_table.md), g-token units.

    Entries that are not slices (b = 0, l = 0, c + l > U) are inf. With `include_p2p` each entry
    also pays two P2P transfers (activations forward, their gradient back), as TeraPipe does:
    a stage cannot start a slice before that slice's input has arrived.
    """
    problem = granularity_problem(granularity, seq_length)
    if problem is not None:
        raise ValueError(problem)
    if max_batch < 1:
        raise ValueError(f"batch must be >= 1, got {max_batch}")
    units = seq_length // granularity
    table = np.full((max_batch + 1, units + 1, units + 1), np.inf)
    b, n, c = np.meshgrid(
        np.arange(1, max_batch + 1), np.arange(1, units + 1), np.arange(units), indexing="ij"
    )
    valid = c + n <= units
    b, n, c = b[valid], n[valid], c[valid]
    times = _evaluate(model.forward_backward_time, b, n * granularity, c * granularity)
    if include_p2p:
        times = times + 2.0 * _evaluate(model.p2p_time, b, n * granularity)
    table[b, n, c] = times
    return table


def _evaluate(fn: Any, *arrays: np.ndarray) -> np.ndarray:
    """Call `fn` on whole arrays when it takes them, element by element otherwise."""
    owner = getattr(fn, "__self__", None)
    if getattr(owner, "supports_arrays", False):
        out = np.broadcast_to(np.asarray(fn(*arrays), dtype=np.float64), arrays[0].shape)
        return np.array(out)
    return np.array([fn(*(int(a[i]) for a in arrays)) for i in range(arrays[0].size)],
                    dtype=np.float64)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
