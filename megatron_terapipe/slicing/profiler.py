"""Measure one pipeline stage on this device and fit TeraPipe's latency model to it.

`profile_stage(measure_fn, grid)` is independent of how time is measured, so tests and other
back-ends can inject their own `measure_fn(batch, slice_len, context_len) -> seconds`.
`measure_fn_for_megatron_stage` is the real one: it builds this stage's megatron-core layers
with the prefix-KV attention (the layers the token pipeline runs) and times the forward and
backward of one slice whose prefix K/V are already in the slice context, as in a real step.

Profiling leaves the job it runs in exactly as it found it: every random-number state (Python,
NumPy, the CPU and CUDA generators, megatron's tensor-parallel RNG tracker) is restored after
building the block and after every measurement, and the block is private (no parameter,
gradient or optimizer state of the model being trained is touched). A run with
``--token-pipeline-cost-model profile`` therefore trains bit-identically to one given the
same slices explicitly.

Tensor parallelism is profiled as one TP shard: a TP=1 stack whose attention has a/t heads and
whose MLP has f/t hidden units, i.e. the matmuls one rank runs. The TP all-reduces are not in
the measurement (profile on a TP group, or add them from the analytic model, if they matter).

An MoE GPT (`num_experts`) is profiled on its real MoE layers (megatron-core's MoE spec with
SequentialMLP experts, its router and dispatcher, the shared expert), expert parallelism 1:
with balanced routing a rank's expert GEMMs cover top-k x its own tokens whatever EP is, and
the all-to-all between EP ranks is not in the measurement. The aux and z-losses are left out:
they are elementwise over the router's logits, and the token pipeline forms them only once a
micro-batch's last slice has run, which a single-slice measurement does not do.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_terapipe.slicing.profiled import ProfiledCostModel
from megatron_terapipe.timing import device_synchronize, synchronized_clock

MeasureFn = Callable[[int, int, int], float]


@dataclass(frozen=True)
class ProfileGrid:
    """Points to measure: every (b, l) at context 0, plus (b, l, c) for the context term."""

    batches: tuple[int, ...]
    slice_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    seq_length: int

    def points(self) -> list[tuple[int, int, int]]:
        out = []
        for b in self.batches:
            for n in self.slice_lens:
                for c in sorted({0, *self.context_lens}):
                    if n + c <= self.seq_length:
                        out.append((b, n, c))
        return out


def default_grid(
    seq_length: int, max_batch: int = 1, granularity: int = 1, num_lens: int = 6,
    num_contexts: int = 4,
) -> ProfileGrid:
    """Geometric slice lengths from one granule to the sequence; a few contexts across it."""
    units = seq_length // granularity
    lens = sorted({max(1, round(units ** (k / (num_lens - 1)))) * granularity
                   for k in range(num_lens)})
    contexts = sorted({round(units * k / num_contexts) * granularity
                       for k in range(num_contexts)} - {seq_length})
    batches = sorted({1, max_batch, (1 + max_batch) // 2})
    return ProfileGrid(tuple(batches), tuple(lens), tuple(contexts), seq_length)


def profile_stage(
    measure_fn: MeasureFn,
    grid: ProfileGrid,
    repeats: int = 1,
    meta: dict | None = None,
    p2p: dict | None = None,
    log: Callable[[str], None] | None = None,
    seed: int = 0,
) -> ProfiledCostModel:
    """Time every grid point and fit; the fit's R² is on the result.

    The grid is measured `repeats` times, each pass in a new random order, and each point keeps
    its least time: interference from other processes only ever adds time and comes in bursts,
    so repeats spread over the whole run dodge it better than back-to-back ones.
    """
    points = grid.points()
    best = dict.fromkeys(points, float("inf"))
    rng = random.Random(seed)
    for _ in range(max(1, repeats)):
        order = list(points)
        rng.shuffle(order)
        for point in order:
            best[point] = min(best[point], float(measure_fn(*point)))
    samples = [(b, n, c, best[b, n, c]) for b, n, c in points]
    forward = getattr(measure_fn, "forward_seconds", None)
    extra = dict(p2p or {})
    if forward and all(p in forward for p in points):
        # Time-weighted: long slices, which dominate a step, dominate the ratio too.
        fwd = sum(forward[p] for p in points)
        total = sum(best[p] for p in points)
        if 0 < fwd < total:
            extra["backward_ratio"] = (total - fwd) / fwd
    if log is not None:
        for b, n, c, seconds in samples:
            log(f"profile b={b} l={n} c={c}: {seconds * 1e3:.3f} ms")
    info = dict(meta or {})
    info.update(grid={"batches": list(grid.batches), "slice_lens": list(grid.slice_lens),
                      "context_lens": list(grid.context_lens), "seq_length": grid.seq_length},
                samples=[list(s) for s in samples])
    return ProfiledCostModel.fit(samples, meta=info, **extra)


def measure_fn_for_megatron_stage(
    args: Any = None,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    num_experts: int | None = None,
    moe_router_topk: int = 2,
    moe_ffn_hidden_size: int | None = None,
    moe_shared_expert_intermediate_size: int | None = None,
    dtype: Any = None,
    warmup: int = 1,
    repeats: int = 1,
    clock: str | None = None,
    profiled_layers: int | None = None,
) -> MeasureFn:
    """A measure_fn timing this stage's real megatron-core layers with prefix-KV attention.

    Dims come from a Megatron namespace `args` or the keywords (Megatron-LM's names; the MoE
    ones, with `num_experts`, make the layers MoE layers). Needs megatron-core; runs in a
    private single-rank process group when torch.distributed is not initialized.

    clock: 'wall' (default on GPU: synchronised wall time) or 'cpu' (default on CPU: the CPU
    time of the measuring thread, with one intra-op thread as the gloo demo ranks run). CPU time
    does not count the time other processes hold the core, so a shared machine still gives
    clean numbers.
    """
    import torch

    dims = _stage_dims(args, num_layers, hidden_size, num_attention_heads, num_query_groups,
                       ffn_hidden_size, tensor_model_parallel_size, pipeline_model_parallel_size)
    dims.update(_moe_dims(args, dims, num_experts, moe_router_topk, moe_ffn_hidden_size,
                          moe_shared_expert_intermediate_size))
    _ensure_single_rank_megatron(expert_layers="num_experts" in dims)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = dims["layers_per_stage"]
    if profiled_layers is not None:
        if profiled_layers < 1:
            raise ValueError(f"profiled_layers must be >= 1, got {profiled_layers}")
        built = min(built, int(profiled_layers))
    scale = dims["layers_per_stage"] / built
    with preserved_rng_state():
        block = _build_block(dims, dtype, device, built)
    hidden = dims["hidden_size"]
    clock = clock or ("wall" if device.type == "cuda" else "cpu")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock={clock!r}; valid: wall, cpu")

    def now() -> float:
        if clock == "wall":
            return synchronized_clock()
        device_synchronize()
        return time.thread_time()

    def run_once(batch: int, slice_len: int, context_len: int) -> float:
        from megatron_terapipe.model import TokenSliceContext, activate

        slices = (context_len, slice_len) if context_len else (slice_len,)
        context = TokenSliceContext(slices, requires_grad=True)
        with activate(context):
            if context_len:
                prefix = torch.randn(context_len, batch, hidden, device=device, dtype=dtype)
                with torch.no_grad(), context.running(0, 0, 0):
                    block(prefix, attention_mask=None)
            x = torch.randn(slice_len, batch, hidden, device=device, dtype=dtype,
                            requires_grad=True)
            grad = torch.randn(slice_len, batch, hidden, device=device, dtype=dtype)
            start = now()
            with context.running(0, 0, len(slices) - 1):
                out = block(x, attention_mask=None)
                middle = now()
                out.backward(grad)
            end = now()
            return end - start, middle - start

    warmed: set[tuple[int, int, int]] = set()
    forward_seconds: dict[tuple[int, int, int], float] = {}

    def measure(batch: int, slice_len: int, context_len: int) -> float:
        threads = torch.get_num_threads()
        if clock == "cpu":
            torch.set_num_threads(1)  # all work on this thread, so thread_time sees it all
        try:
            point = (batch, slice_len, context_len)
            with preserved_rng_state():
                for _ in range(0 if point in warmed else warmup):
                    run_once(batch, slice_len, context_len)
                warmed.add(point)
                # The least of the repeats: interference only ever adds time.
                total, forward = min(
                    run_once(batch, slice_len, context_len) for _ in range(max(1, repeats))
                )
            best = forward_seconds.get(point)
            forward_seconds[point] = scale * forward if best is None else min(best, scale * forward)
            return scale * total
        finally:
            torch.set_num_threads(threads)

    measure.dims = dims  # type: ignore[attr-defined]
    measure.device = str(device)  # type: ignore[attr-defined]
    measure.clock = clock  # type: ignore[attr-defined]
    measure.profiled_layers = built  # type: ignore[attr-defined]
    measure.moe_layers = _moe_layer_count(block)  # type: ignore[attr-defined]
    measure.bytes_per_element = torch.empty((), dtype=dtype).element_size()  # type: ignore[attr-defined]
    measure.forward_seconds = forward_seconds  # type: ignore[attr-defined]
    return measure


def datasheet_p2p(hidden_size: int, bytes_per_element: int, preset: str | None = None
                  ) -> dict[str, float]:
    """P2P terms of a profile from the device preset's link (a stage alone cannot time them):
    one message carries hidden_size elements per token."""
    from megatron_terapipe.slicing.cost_models import DEVICE_PRESETS, detect_device_preset

    rates = DEVICE_PRESETS[preset or detect_device_preset()]
    return {"p2p_latency_s": rates.link_latency_s,
            "p2p_bandwidth_gbps": rates.link_bandwidth_gbps,
            "p2p_bytes_per_token": float(hidden_size * bytes_per_element)}


# What start-up profiling (the default cost model) times: one layer of the stage, scaled to the
# stage, in two passes over the default grid. About 3 runs per grid point in all.
STARTUP_PROFILED_LAYERS = 1
STARTUP_PASSES = 2


def startup_profile(args: Any, granularity: int,
                    log: Callable[[str], None] | None = None) -> ProfiledCostModel:
    """The profile `--token-pipeline-cost-model profile` plans with: this stage's layers, in
    the job's dtype, on this device, for its sequence length and micro-batch size."""
    import torch

    dtype = (torch.bfloat16 if getattr(args, "bf16", False) else
             torch.float16 if getattr(args, "fp16", False) else torch.float32)
    started = time.perf_counter()
    measure = measure_fn_for_megatron_stage(args, dtype=dtype,
                                            profiled_layers=STARTUP_PROFILED_LAYERS)
    grid = default_grid(int(args.seq_length), int(getattr(args, "micro_batch_size", 1) or 1),
                        granularity)
    meta = {"dims": measure.dims, "device": measure.device, "clock": measure.clock,
            "profiled_layers": measure.profiled_layers, "moe_layers": measure.moe_layers,
            "passes": STARTUP_PASSES}
    p2p = datasheet_p2p(measure.dims["hidden_size"], measure.bytes_per_element)
    profile = profile_stage(measure, grid, repeats=STARTUP_PASSES, meta=meta, p2p=p2p, log=log)
    profile.meta["profile_seconds"] = round(time.perf_counter() - started, 3)
    profile.source = "start-up"
    return profile


def _stage_dims(args: Any, *values: Any) -> dict[str, int]:
    names = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
             "ffn_hidden_size", "tensor_model_parallel_size", "pipeline_model_parallel_size")
    dims = dict(zip(names, values))
    if args is not None:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                dims[name] = value
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if not dims.get(name):
            raise ValueError(f"profiling a stage needs {name} (from args or as a keyword)")
    dims["num_query_groups"] = dims["num_query_groups"] or dims["num_attention_heads"]
    dims["ffn_hidden_size"] = dims["ffn_hidden_size"] or 4 * dims["hidden_size"]
    t = int(dims["tensor_model_parallel_size"] or 1)
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if dims[name] % t:
            raise ValueError(f"{name}={dims[name]} is not divisible by tensor parallel size {t}")
    dims["tensor_model_parallel_size"] = t
    dims["pipeline_model_parallel_size"] = int(dims["pipeline_model_parallel_size"] or 1)
    dims["layers_per_stage"] = math.ceil(dims["num_layers"] / dims["pipeline_model_parallel_size"])
    return dims


def _moe_dims(args: Any, dims: dict[str, int], *values: Any) -> dict[str, int]:
    """The MoE layer's dims (Megatron-LM's names), from `args` or the keywords; {} if dense."""
    names = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size",
             "moe_shared_expert_intermediate_size")
    moe = dict(zip(names, values))
    if args is not None:
        for name in names:
            if getattr(args, name, None) is not None:
                moe[name] = getattr(args, name)
    if moe["num_experts"] is None:
        return {}
    moe["moe_ffn_hidden_size"] = moe["moe_ffn_hidden_size"] or dims["ffn_hidden_size"]
    moe["moe_shared_expert_intermediate_size"] = moe["moe_shared_expert_intermediate_size"] or 0
    t = dims["tensor_model_parallel_size"]
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        if moe[name] % t:
            raise ValueError(f"{name}={moe[name]} is not divisible by tensor parallel size {t}")
    return {name: int(value) for name, value in moe.items()}


def _moe_layer_count(block: Any) -> int:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sum(isinstance(module, MoELayer) for module in block.modules())


def _ensure_single_rank_megatron(expert_layers: bool = False) -> None:
    """Megatron layers need model-parallel groups; with no job running, make a 1-rank one."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not torch.cuda.is_available():
        from megatron_terapipe.compat import enable_cpu

        enable_cpu()
    if dist.is_initialized():
        if parallel_state.model_parallel_is_initialized():
            if parallel_state.get_tensor_model_parallel_world_size() != 1:
                raise ValueError(
                    "profiling runs one TP shard on one rank; inside a job with tensor "
                    "parallelism, profile once beforehand (terapipe-plan --cost-model profile "
                    "--profile-out FILE.json) and pass --token-pipeline-cost-model FILE.json"
                )
            if expert_layers and parallel_state.get_expert_model_parallel_world_size() != 1:
                # The MoE layers' dispatcher would exchange tokens with EP ranks that are not
                # profiling (one rank profiles, then broadcasts the plan).
                raise ValueError(
                    "profiling runs MoE layers on one rank; inside a job with expert "
                    "parallelism, pass explicit --token-pipeline-slices or a saved profile "
                    "(--token-pipeline-cost-model FILE.json)"
                )
            return
        if dist.get_world_size() != 1:
            raise ValueError("profiling needs model-parallel groups or a single-rank job")
    else:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, 1, True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def _build_block(dims: dict[str, int], dtype: Any, device: Any, num_layers: int) -> Any:
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_terapipe.model import token_pipeline_layer_spec
    from megatron_terapipe.model.transformer_config import transformer_config

    t = dims["tensor_model_parallel_size"]
    # One TP shard's layer on one rank: the per-rank head and FFN sizes, TP size 1.
    config = transformer_config(
        num_layers=num_layers,
        hidden_size=dims["hidden_size"],
        num_attention_heads=dims["num_attention_heads"] // t,
        num_query_groups=dims["num_query_groups"] // t,
        kv_channels=dims["hidden_size"] // dims["num_attention_heads"],
        ffn_hidden_size=dims["ffn_hidden_size"] // t,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **_moe_settings(dims),
    )
    spec = token_pipeline_layer_spec(
        get_gpt_layer_local_spec(num_experts=dims.get("num_experts"), moe_grouped_gemm=False))
    block = TransformerBlock(config, spec, post_layer_norm=False)
    return block.to(device=device, dtype=dtype).train()


def _moe_settings(dims: dict[str, int]) -> dict[str, Any]:
    """The profiled MoE layer's settings ({} for a dense stage; Megatron-LM's names): one TP
    shard of each expert (expert TP = TP), dropless top-k, the alltoall dispatcher (at EP 1
    every dispatcher permutes locally), no aux or z-loss (module docstring), no linear biases
    (megatron-core's expert MLP adds its bias in place to a custom autograd function's output,
    which backward refuses here, as in MoE training)."""
    if "num_experts" not in dims:
        return {}
    t = dims["tensor_model_parallel_size"]
    shared = dims["moe_shared_expert_intermediate_size"] // t
    return dict(
        num_experts=dims["num_experts"],
        moe_router_topk=dims["moe_router_topk"],
        moe_ffn_hidden_size=dims["moe_ffn_hidden_size"] // t,
        moe_shared_expert_intermediate_size=shared or None,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        add_bias_linear=False,
    )


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the body, then put back every RNG state a training job draws from."""
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker_states = {name: state.clone() for name, state in tracker.get_states().items()}
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        tracker.set_states(tracker_states)


def grid_from_points(points: Sequence[tuple[int, int, int]], seq_length: int) -> ProfileGrid:
    """A grid covering given points (for re-profiling what a saved profile measured)."""
    return ProfileGrid(
        tuple(sorted({p[0] for p in points})),
        tuple(sorted({p[1] for p in points})),
        tuple(sorted({p[2] for p in points})),
        seq_length,
    )
