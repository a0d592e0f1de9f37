"""One micro-batch through one pipeline stage, slice by slice: the executor's inner loop alone.

Useful to check a model (or a new attention backend) for token-slicing exactness without any
pipeline communication: forwards of slices 0..S-1 in order, then backwards S-1..0, each an
ordinary autograd call, exactly as the executor runs them per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_terapipe.model.batch_slicing import slice_batch
from megatron_terapipe.model.positions import install_rope_offset_hooks
from megatron_terapipe.model.slice_context import TokenSliceContext, activate
from megatron_terapipe.token_slices import validate_token_slices


def sliced_forward_backward(
    model: torch.nn.Module,
    batch: Any,
    token_slices: Sequence[int],
    seq_length: int,
    loss_of_slice: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Forward and backward of `batch` cut into `token_slices`; returns the token-mean loss.

    `loss_of_slice(model, sliced_batch)` returns (sum of the slice's token losses, its token
    count). The gradient left in the parameters is that of the whole micro-batch's token-mean
    loss, as if the batch had run unsliced.
    """
    slices = validate_token_slices(token_slices, seq_length)
    install_rope_offset_hooks([model])
    context = TokenSliceContext(slices)
    sums, counts = [], []
    with activate(context):
        for t, (offset, length) in enumerate(zip(context.offsets, slices)):
            with context.running(0, 0, t):
                loss_sum, count = loss_of_slice(
                    model, slice_batch(batch, seq_length, offset, length)
                )
            sums.append(loss_sum)
            counts.append(count)
        total = torch.clamp(sum(counts), min=1)
        for t in reversed(range(len(slices))):
            with context.running(0, 0, t):
                torch.autograd.backward(sums[t] / total)
            context.release(0, 0, t)
    return (sum(s.detach() for s in sums) / total).detach()
