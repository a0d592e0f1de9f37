"""Cut a micro-batch (any nesting of dicts, lists, tuples and tensors) to one token slice.

The rule, so users can predict it: a tensor is cut along dimension 1 when that dimension has
size seq_length (Megatron batches are [batch, seq]: tokens, labels, loss_mask, position_ids).
A 4-D attention mask [b, 1, seq, seq] keeps the slice's query rows and the key columns of
the slice and everything before it: [b, 1, l, offset + l], the keys prefix-KV attention sees
(so --reset-attention-mask document masks and --reset-position-ids positions stay exact).
Anything else passes through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def slice_batch(batch: Any, seq_length: int, offset: int, length: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return _slice_tensor(batch, seq_length, offset, length)
    if isinstance(batch, dict):
        return type(batch)(
            (key, slice_batch(value, seq_length, offset, length)) for key, value in batch.items()
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, seq_length, offset, length) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, seq_length, offset, length) for v in batch)
    return batch


def _slice_tensor(tensor: torch.Tensor, seq_length: int, offset: int, length: int) -> torch.Tensor:
    # Contiguous copies: user code (pretrain_gpt's loss) calls .view() on what it gets.
    if tensor.dim() == 4 and tensor.shape[-1] == seq_length and tensor.shape[-2] == seq_length:
        return tensor[:, :, offset : offset + length, : offset + length].contiguous()
    if tensor.dim() >= 2 and tensor.shape[1] == seq_length:
        return tensor[:, offset : offset + length].contiguous()
    return tensor
