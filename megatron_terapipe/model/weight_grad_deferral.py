"""Split a backward into its input gradient (B) and its weight gradients (W).

A split schedule (`split_backward_orders`) sends a unit's input gradient to the previous stage
before that unit's weight-gradient GEMMs run, so the previous stage starts its backward earlier
at every hop (Zero Bubble, Qi et al. 2023, at token-slice granularity).

The weight-gradient GEMMs are megatron-core's own: with gradient-accumulation fusion, its linear
layers' backward (`LinearWithGradAccumulationAndAsyncCommunication`) hands them to
`fused_weight_gradient_mlp_cuda` (apex on GPUs, `compat.cpu`'s equivalent on the CPU) as
(input, output gradient, main_grad). `install_weight_grad_deferral` wraps that kernel module so
that, while a split backward collects (`deferring_weight_grads`, whose queue this module keeps
in the step's slice context), each call is queued with its tensors instead of run; the W action
runs the queue with the same kernel in the same order, so the gradients are bitwise those of
the unsplit backward. Outside a collecting backward the wrapper calls straight through.

Not every layer can be split this way (reasons: `unsupported_features.SPLIT_BACKWARD_LIMITS`).
The argument check rejects by flag what the flags show; `check_split_backward`, which the
trainer (right after building the model) and the executor (before its first split step) call,
rejects what only the built model shows, such as a fused kernel that is missing or Transformer
Engine layers chosen by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from megatron_terapipe.model.slice_context import TokenSliceContext, get_slice_context
from megatron_terapipe.unsupported_features import SPLIT_BACKWARD_LIMITS

_TE_MODULES = ("transformer_engine", "megatron.core.extensions.transformer_engine")


class DeferredWeightGrads:
    """The weight-gradient GEMMs one backward queued, in call order.

    Until W runs, the queue keeps each GEMM's input and output gradient alive (the unsplit
    backward frees them layer by layer): one slice's worth, since W follows its B."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable, tuple]] = []
        self.queued = 0  # calls queued so far, including those already run

    def add(self, kernel: Callable, args: tuple) -> None:
        """Queue one kernel call (input, output gradient, main_grad)."""
        self.calls.append((kernel, args))
        self.queued += 1

    def run(self) -> None:
        """Run every queued GEMM once (into main_grad) and drop the tensors they held; without
        autograd, as inside the backward that queued them."""
        calls, self.calls = self.calls, []
        with torch.no_grad():
            for kernel, args in calls:
                kernel(*args)


class _DeferringWeightGradKernel:
    """Stands in for megatron-core's `fused_weight_gradient_mlp_cuda` module: its two entry
    points queue while a split B collects, and call straight through otherwise."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def wgrad_gemm_accum_fp32(self, total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        _call_or_queue(self.kernel.wgrad_gemm_accum_fp32, total_input, grad_output, main_grad)

    def wgrad_gemm_accum_fp16(self, total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        _call_or_queue(self.kernel.wgrad_gemm_accum_fp16, total_input, grad_output, main_grad)

    def __getattr__(self, name: str) -> Any:
        if name == "kernel":  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.kernel, name)


class _Collecting:
    """This module's channel in the step's slice context: the queue of the split backward
    running now, None outside one. Kept in the context (`TokenSliceContext.step_state`) because
    the wrapped kernel is called by megatron-core with no handle of ours, and so that it ends
    with the step."""

    def __init__(self) -> None:
        self.queue: DeferredWeightGrads | None = None


def _collecting(context: TokenSliceContext) -> _Collecting:
    return context.step_state(_Collecting, _Collecting)


def _call_or_queue(kernel: Callable, *args: torch.Tensor) -> None:
    context = get_slice_context()
    queue = _collecting(context).queue if context is not None else None
    if queue is None:
        kernel(*args)
    else:
        queue.add(kernel, args)


def install_weight_grad_deferral() -> None:
    """Wrap megatron-core's weight-gradient kernel once per process (idempotent).

    Raises RuntimeError when megatron-core has no such kernel (no gradient-accumulation fusion:
    neither apex nor this package's CPU equivalent), since nothing could then be deferred.
    """
    from megatron.core.tensor_parallel import layers

    kernel = getattr(layers, "fused_weight_gradient_mlp_cuda", None)
    # An assert-style guard, not reachable through the command line: check_split_backward has
    # refused a config without gradient-accumulation fusion, and megatron-core's linear layers
    # refuse that fusion without this kernel. It stays for callers that install it by hand.
    if kernel is None or not getattr(layers, "_grad_accum_fusion_available", False):
        raise RuntimeError(
            "--token-pipeline-split-backward needs megatron-core's gradient-accumulation fusion "
            "kernel (apex's fused_weight_gradient_mlp_cuda on GPUs; on the CPU this package "
            "installs one); it is not available here"
        )
    if not isinstance(kernel, _DeferringWeightGradKernel):
        layers.fused_weight_gradient_mlp_cuda = _DeferringWeightGradKernel(kernel)


@contextlib.contextmanager
def deferring_weight_grads(context: TokenSliceContext) -> Iterator[DeferredWeightGrads]:
    """Queue the weight-gradient GEMMs of the backward run inside, instead of running them."""
    collecting = _collecting(context)
    if collecting.queue is not None:
        raise RuntimeError("token pipeline: weight gradients are already being deferred")
    queue = DeferredWeightGrads()
    collecting.queue = queue
    try:
        yield queue
    finally:
        collecting.queue = None


def _defers(module: torch.nn.Module) -> bool:
    """Whether `module` is a megatron-core linear whose backward calls the fused kernel."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and bool(
        getattr(module, "gradient_accumulation_fusion", False)
    )


def split_backward_problems(config: Any, models: Sequence[torch.nn.Module] = ()) -> list[str]:
    """Why a model with this megatron-core TransformerConfig (and these modules) cannot split
    its backwards exactly (empty when it can), with the argument check's reasons."""
    why = SPLIT_BACKWARD_LIMITS
    problems = []
    if not getattr(config, "gradient_accumulation_fusion", False):
        problems.append(
            "gradient_accumulation_fusion is off (--no-gradient-accumulation-fusion, or no fused "
            f"kernel): {why['gradient_accumulation_fusion']}"
        )
    if getattr(config, "sequence_parallel", False):
        problems.append(f"sequence_parallel (--sequence-parallel): {why['sequence_parallel']}")
    if models and not any(_defers(module) for model in models for module in model.modules()):
        problems.append(
            "no megatron-core ColumnParallelLinear/RowParallelLinear with gradient-accumulation "
            "fusion in the model: nothing would hand its weight gradient to the W action"
        )
    if any(hasattr(p, "__fsdp_param__") for model in models for p in model.parameters()):
        problems.append(f"Megatron-FSDP (--use-megatron-fsdp): {why['megatron_fsdp']}")
    engine = sorted(
        {
            type(module).__name__
            for model in models
            for module in model.modules()
            if type(module).__module__.startswith(_TE_MODULES)
        }
    )
    if engine:
        problems.append(
            f"Transformer Engine layers ({', '.join(engine[:3])}; --transformer-impl "
            f"transformer_engine): {why['transformer_engine']}"
        )
    return problems


def check_split_backward(
    config: Any, models: Sequence[torch.nn.Module] = (), more_problems: Sequence[str] = ()
) -> None:
    """Raise ValueError naming every reason (`split_backward_problems` and the caller's
    `more_problems`) why these models cannot split their backwards exactly.

    The one message for these limits: the trainer calls this as soon as the model exists (a
    start-up error instead of a failed first step), the executor before its first split step
    (for callers that built the model themselves).
    """
    problems = [*split_backward_problems(config, models), *more_problems]
    if problems:
        raise ValueError(
            "--token-pipeline-split-backward (TokenPipelineConfig.split_backward) cannot run "
            "exactly with: " + "; ".join(problems)
        )
