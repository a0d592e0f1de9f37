"""The CPU remaps behind `enable_cpu()`.

Each remap replaces a CUDA-only call that would raise on a machine without CUDA, so applying
them never changes behaviour that worked before. They are process-wide (megatron-core calls
`torch.cuda.*` from many modules and from code imported later), installed once, and recorded in
`applied_patches()` so a test or a user can see exactly what was changed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

import torch

_PATCHES: list[str] = []
_ENABLED = False


def cpu_enabled() -> bool:
    """Whether `enable_cpu()` has installed the remaps in this process."""
    return _ENABLED


def applied_patches() -> list[str]:
    """Names of the remaps installed, for diagnostics."""
    return list(_PATCHES)


def _patch(owner: Any, name: str, value: Any, label: str) -> None:
    setattr(owner, name, value)
    _PATCHES.append(label)


class _CpuWeightGradAccumulation:
    """apex's fused_weight_gradient_mlp_cuda on the CPU: main_grad += grad_outputᵀ · input.

    Inputs arrive 2-D ([tokens, in] and [tokens, out]); the product is formed in main_grad's
    dtype (fp32 for the fp32 entry point, as apex accumulates), added in place.
    """

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        dtype = main_grad.dtype
        main_grad.addmm_(grad_output.t().to(dtype), total_input.to(dtype))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


class _CpuEvent:
    """An event on the CPU's stream: everything before it has run by the time it is asked."""

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """The CPU's one stream under CUDA's stream API: waits are no-ops, events are done."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron-core's maybe_move_tensor_to_cpu for tensors already on the host."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _cpu_device_for(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):
        return "cpu"
    return device


def _on_cpu(factory: Callable) -> Callable:
    """Wrap a tensor factory so that `device="cuda"` (or an index) lands on the CPU."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_for(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


class _TorchOnCpu:
    """A stand-in for the `torch` module inside one megatron module with `device="cuda"` literals.

    Only the tensor factories are wrapped; every other attribute is the real torch's.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self) -> None:
        for name in self._FACTORIES:
            object.__setattr__(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _make_cpu_rng_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker with the CPU generator standing in for the CUDA one.

        On CPU the "device" RNG and the CPU RNG are the same generator, so `fork` swaps that one
        generator's state in and out (the stock fork would warn on every call that the CPU state
        changed inside a GPU RNG context).
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            outer_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.rerun_state_machine",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _type_as_if_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    return type_


def _sequence_parallel_torch_norm(original_new: Callable) -> Callable:
    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        import dataclasses

        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, *args, **kwargs
        )
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(new)


def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _sliding_window_mask_cpu(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool)
    upper = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(upper, diagonal=skv - sq + window_size[1])


def _no_compile(model: Any = None, **_kwargs: Any) -> Any:
    """torch.compile's call forms (`@compile`, `@compile(...)`), compiling nothing."""
    return model if model is not None else (lambda fn: fn)


def _import_megatron_without_torch_compile() -> bool:
    """Import megatron-core with its `jit_fuser` bound to the identity instead of torch.compile.

    megatron.core.jit binds `jit_fuser = torch.compile` at import, and its fusion modules apply
    it at import, which imports torch's inductor: about 40% of a process's start-up CPU time,
    paid by every spawned rank. On CPU those fusions are off (TransformerConfig's *_fusion
    flags) or run eagerly just as well. torch.compile itself is swapped only while megatron
    imports. Returns False (changing nothing) if megatron-core was already imported.
    """
    if "megatron.core" in sys.modules:
        return False
    original = torch.compile
    torch.compile = _no_compile
    try:
        importlib.import_module("megatron.core")
        jit = importlib.import_module("megatron.core.jit")
        jit.disable_jit_fuser()
    finally:
        torch.compile = original
    return True


def enable_cpu(force: bool = False) -> bool:
    """Install the CPU remaps; returns whether they are active.

    A no-op when CUDA is available unless `force=True` (a GPU machine running CPU tests).
    Idempotent. Call it before building models; `model_parallel_cuda_manual_seed` works after it.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    if _import_megatron_without_torch_compile():
        _PATCHES.append("megatron.core.jit.jit_fuser -> identity (no torch.compile on CPU)")
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils

    cuda = torch.cuda
    # Buffers are created with device=torch.cuda.current_device() all over megatron-core.
    _patch(cuda, "current_device", lambda: torch.device("cpu"), "torch.cuda.current_device -> cpu")
    _patch(cuda, "synchronize", lambda *a, **k: None, "torch.cuda.synchronize -> no-op")
    _patch(cuda, "manual_seed", torch.manual_seed, "torch.cuda.manual_seed -> torch.manual_seed")
    _patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state(), "torch.cuda.get_rng_state")
    _patch(
        cuda, "set_rng_state", lambda s, *a, **k: torch.set_rng_state(s), "torch.cuda.set_rng_state"
    )
    _patch(cuda, "empty_cache", lambda: None, "torch.cuda.empty_cache -> no-op")
    # megatron-core 0.19.0's DDP bucket groups wait on torch.cuda.current_stream() for CUDA-graph
    # weight gradients in every start_grad_sync. MoE's alltoall dispatcher and shared experts
    # make side streams, enter them around copies, record events on them and synchronize on
    # those. The CPU runs everything in order on one stream, so every stream is that one
    # (equal streams also make the dispatcher skip record_stream, which CPU tensors lack).
    _patch(cuda, "current_stream", lambda *a, **k: _CPU_STREAM,
           "torch.cuda.current_stream -> the CPU's one stream")
    _patch(cuda, "Stream", lambda *a, **k: _CPU_STREAM, "torch.cuda.Stream -> the CPU's one stream")
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext(),
           "torch.cuda.stream(...) -> no-op context")
    _patch(cuda, "max_memory_allocated", lambda *a, **k: 0, "torch.cuda.max_memory_allocated -> 0")
    _patch(cuda, "memory_allocated", lambda *a, **k: 0, "torch.cuda.memory_allocated -> 0")
    _patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None, "reset_peak_memory_stats")
    # language_module moves tied embedding weights with `.data.cuda()`.
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self, "Tensor.cuda -> identity")

    # The optimizers check dtypes by type name ('torch.cuda.FloatTensor'); on CPU the CPU *is*
    # megatron's device, so report CPU tensors under the CUDA names it expects.
    _patch(torch.Tensor, "type", _type_as_if_cuda(torch.Tensor.type), "Tensor.type() names -> cuda")

    # These modules create tensors with a literal device="cuda"; give each a torch whose
    # tensor factories put them on the CPU.
    cpu_torch = _TorchOnCpu()
    for module_name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            _patch(module, "torch", cpu_torch, f"{module_name}.torch factories -> cpu")

    # The default causal masks are built with device="cuda".
    for module in (transformer_utils, fused_softmax):
        _patch(
            module, "get_default_causal_mask", _causal_mask_cpu, f"{module.__name__} causal mask"
        )
        _patch(
            module,
            "get_sliding_window_causal_mask",
            _sliding_window_mask_cpu,
            f"{module.__name__} sliding-window mask",
        )

    # Without apex/TE the local spec's norm is WrappedTorchNorm, which refuses sequence
    # parallelism; FusedLayerNorm's only SP-specific work is tagging its parameters so that
    # finalize_model_grads all-reduces their grads over TP. Do the same around torch's norm.
    from megatron.core.transformer import torch_norm

    _patch(
        torch_norm.WrappedTorchNorm,
        "__new__",
        _sequence_parallel_torch_norm(torch_norm.WrappedTorchNorm.__new__),
        "WrappedTorchNorm: sequence parallelism (params tagged for TP grad all-reduce)",
    )

    # The RNG tracker and activation checkpointing save/restore the CUDA generator.
    _patch(
        mcore_random,
        "_get_cuda_rng_state",
        lambda *a, **k: torch.get_rng_state(),
        "tensor_parallel.random._get_cuda_rng_state -> cpu",
    )
    _patch(
        mcore_random,
        "_set_cuda_rng_state",
        lambda state, *a, **k: torch.set_rng_state(state),
        "tensor_parallel.random._set_cuda_rng_state -> cpu",
    )
    # Megatron-LM's default --gradient-accumulation-fusion: the weight-gradient GEMM accumulates
    # straight into the fp32 main_grad (apex's fused_weight_gradient_mlp_cuda on GPUs). Its CPU
    # equivalent, so that a CPU run takes the path a GPU run takes (one GEMM into main_grad per
    # backward instead of a GEMM, a .grad and DDP's add).
    from megatron.core.tensor_parallel import layers as tp_layers

    if not tp_layers._grad_accum_fusion_available:
        _patch(tp_layers, "fused_weight_gradient_mlp_cuda", _CpuWeightGradAccumulation,
               "fused_weight_gradient_mlp_cuda -> CPU addmm_ into main_grad")
        _patch(tp_layers, "_grad_accum_fusion_available", True,
               "gradient-accumulation fusion available (CPU addmm_)")

    # MoE's alltoall dispatcher moves its split sizes "to the CPU as numpy" only when they are
    # on a GPU; on the CPU they stayed tensors, which all_to_all_single does not take as sizes.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for module in (moe_utils, token_dispatcher):
        if hasattr(module, "maybe_move_tensor_to_cpu"):
            _patch(module, "maybe_move_tensor_to_cpu", _to_host,
                   f"{module.__name__}.maybe_move_tensor_to_cpu: numpy for CPU tensors too")
    # megatron-core 0.16's router gating GEMM tests `te_general_gemm is not None`, a name bound
    # only when Transformer Engine imports; without it the name is missing, not None.
    if "RouterGatingLinearFunction" in vars(moe_utils) and "te_general_gemm" not in vars(moe_utils):
        _patch(moe_utils, "te_general_gemm", None,
               "moe_utils.te_general_gemm -> None (no Transformer Engine: torch's GEMM)")

    tracker_class = _make_cpu_rng_tracker_class(mcore_random.CudaRNGStatesTracker)
    _patch(mcore_random, "CudaRNGStatesTracker", tracker_class, "CPU RNG states tracker")
    if mcore_random._CUDA_RNG_STATE_TRACKER is not None:
        mcore_random.initialize_rng_tracker(force_reset=True)

    _ENABLED = True
    return True
