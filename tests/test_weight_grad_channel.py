"""Where a split backward's weight-gradient GEMMs go: queued only inside `deferring_weight_grads`
of the running step, straight through everywhere else (outside it, outside a step, in another
step)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_terapipe.model.slice_context import TokenSliceContext, activate
from megatron_terapipe.model.weight_grad_deferral import (
    _DeferringWeightGradKernel,
    deferring_weight_grads,
)


def _kernel(ran: list[str]) -> _DeferringWeightGradKernel:
    """The wrapper around a stand-in for megatron-core's fused kernel module."""
    return _DeferringWeightGradKernel(
        SimpleNamespace(wgrad_gemm_accum_fp32=lambda x, g, main_grad: ran.append(x))
    )


def test_the_kernel_queues_only_inside_a_collecting_backward():
    ran: list[str] = []
    kernel = _kernel(ran)
    kernel.wgrad_gemm_accum_fp32("no step", None, None)
    step = TokenSliceContext([2, 2])
    with activate(step):
        with deferring_weight_grads(step) as queue:
            kernel.wgrad_gemm_accum_fp32("split B", None, None)
            with pytest.raises(RuntimeError, match="already being deferred"):
                with deferring_weight_grads(step):
                    pass
        assert ran == ["no step"] and queue.queued == 1
        kernel.wgrad_gemm_accum_fp32("unsplit B", None, None)
        queue.run()  # the W action
    assert ran == ["no step", "unsplit B", "split B"]


def test_a_queue_belongs_to_its_step():
    """A step that stopped inside a split backward (its queue never closed) leaves nothing that
    captures the next step's GEMMs: the queue lives in that step's slice context."""
    ran: list[str] = []
    kernel = _kernel(ran)
    stopped = TokenSliceContext([2, 2])
    with activate(stopped):
        collecting = deferring_weight_grads(stopped)
        queue = collecting.__enter__()
        kernel.wgrad_gemm_accum_fp32("stopped step", None, None)
    following = TokenSliceContext([2, 2])
    with activate(following):
        kernel.wgrad_gemm_accum_fp32("next step", None, None)
    assert ran == ["next step"] and queue.queued == 1
