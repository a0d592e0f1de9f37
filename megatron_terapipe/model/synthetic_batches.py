"""Deterministic synthetic token batches in pretrain_gpt.py's batch form.

The benchmark runs every variant on them and the tests' reference runs use them too, so what
is measured and what is checked is the same data. A ragged loss mask (about 20 % of tokens
masked out) makes the per-token loss weighting matter, so a schedule that mis-weights slices
shows up in the benchmark's loss-difference column and in the tests' loss comparison.
"""

from __future__ import annotations

import torch


def synthetic_microbatches(
    vocab_size: int, seq_length: int, micro_batch_size: int, num_microbatches: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """`num_microbatches` dicts of tokens, labels, loss_mask, position_ids ([b, s] each)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        shape = (micro_batch_size, seq_length)
        tokens = torch.randint(0, vocab_size, shape, generator=gen)
        labels = torch.randint(0, vocab_size, shape, generator=gen)
        loss_mask = (torch.rand(shape, generator=gen) > 0.2).float()
        position_ids = torch.arange(seq_length).unsqueeze(0).expand(shape).contiguous()
        batches.append(
            {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "position_ids": position_ids}
        )
    return batches
