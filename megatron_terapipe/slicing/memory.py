"""A simple activation-memory model of one pipeline stage, so the planner can honour a cap.

Peak activation bytes of a stage = held + the largest slice's working set, where

- held: what the schedule keeps for backward, for every token in flight at the first stage
  (the stage that holds the most). Per token and layer that is Korthikanti et al. (2022)'s
  count with the attention internals recomputed or fused (Megatron's selective recompute, or
  flash attention): 34·h/t bytes under sequence parallelism, h·(10 + 24/t) without. The prefix
  K/V that later slices attend to is part of that count: each slice's K and V are kept once, in
  the micro-batch's prefix store, and the slices after it read them there.
  Tokens in flight: 'terapipe' (all forwards, then all backwards) holds every token of the step;
  'token-1f1b' and 'token-interleaved' hold at most min(M, K) micro-batches (a micro-batch's
  slices are released only after its last slice's backward, and 1F1B admits at most K).
- working set of a slice (b sequences, l tokens, c context), one layer at a time: the
  attention scores, probabilities and dropout mask, b·(a/t)·l·(c+l)·5 bytes (zero with
  `fused_attention`), plus the concatenated K/V of prefix and slice it attends over,
  b·(c+l)·2·g·d/t elements.

Only the working set depends on the token slicing, and it enters through a max, so the cap
becomes a per-entry mask of the latency table and the DP stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

GIB = float(1 << 30)


@dataclass
class ActivationMemoryModel:
    """Dims of one stage; `num_layers` is the whole model's, split over `pipeline` stages."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    fused_attention: bool = False
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads

    @classmethod
    def from_args(cls, args: Any) -> ActivationMemoryModel:
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=getattr(args, "num_query_groups", None)
            if getattr(args, "group_query_attention", True)
            else None,
            tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1) or 1,
            pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1) or 1,
            sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
            fused_attention=getattr(args, "attention_backend", None) is not None
            and str(getattr(args, "attention_backend", "")).endswith(("flash", "fused")),
        )

    @property
    def layers_per_stage(self) -> int:
        return math.ceil(self.num_layers / self.pipeline_model_parallel_size)

    def held_bytes_per_token(self) -> float:
        h, t = self.hidden_size, self.tensor_model_parallel_size
        per_layer = 34.0 * h / t if self.sequence_parallel else h * (10.0 + 24.0 / t)
        return per_layer * self.layers_per_stage

    def held_tokens(
        self, schedule: str, batch_slices: tuple[int, ...], seq_length: int, num_stages: int
    ) -> int:
        if schedule == "terapipe":
            return sum(batch_slices) * seq_length
        in_flight = sorted(batch_slices, reverse=True)[: max(1, num_stages)]
        return sum(in_flight) * seq_length

    def held_bytes(
        self, schedule: str, batch_slices: tuple[int, ...], seq_length: int, num_stages: int
    ) -> float:
        tokens = self.held_tokens(schedule, batch_slices, seq_length, num_stages)
        return tokens * self.held_bytes_per_token()

    def slice_bytes(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        """Working set of one slice in one layer; works on numpy arrays."""
        b, n, c = (np.asarray(x, dtype=np.float64) for x in (batch, slice_len, context_len))
        t = self.tensor_model_parallel_size
        d = self.hidden_size // self.num_attention_heads
        scores = 0.0 if self.fused_attention else 5.0 * b * self.num_attention_heads / t * n * (
            c + n
        )
        kv = b * (c + n) * 2.0 * self.num_query_groups * d / t * self.bytes_per_element
        return scores + kv

    def peak_bytes(
        self,
        schedule: str,
        batch_slices: tuple[int, ...],
        token_slices_per_batch_slice: tuple[tuple[int, ...], ...],
        num_stages: int,
    ) -> float:
        """Peak of a whole plan, for reporting and for tests of the planner's mask."""
        seq_length = sum(token_slices_per_batch_slice[0])
        worst = 0.0
        for b, slices in zip(batch_slices, token_slices_per_batch_slice):
            context = 0
            for length in slices:
                worst = max(worst, float(self.slice_bytes(b, length, context)))
                context += length
        return self.held_bytes(schedule, batch_slices, seq_length, num_stages) + worst

    def slice_table(self, max_batch: int, seq_length: int, granularity: int) -> np.ndarray:
        """Working set of every table entry [b, l, c] (units of `granularity` tokens)."""
        units = seq_length // granularity
        b, n, c = np.meshgrid(
            np.arange(max_batch + 1), np.arange(units + 1), np.arange(units + 1), indexing="ij"
        )
        return self.slice_bytes(b, n * granularity, c * granularity)
