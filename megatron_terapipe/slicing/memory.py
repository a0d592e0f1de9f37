"""A simple activation-memory model of one pipeline stage, so the planner can honour a cap.

Peak activation bytes of the first stage (the one that holds the most) =
  held   every token in flight keeps its layer activations for backward: Korthikanti et al.
         (2022)'s count with attention internals not stored (fused SDPA kernels, or Megatron's
         selective recompute): 34·h/t bytes per token and layer under sequence parallelism,
         h·(10 + 24/t) without; the slice's own K/V are part of it, kept once in the KV store.
  + copies  each in-flight slice also saves, for its backward, the K/V it attended over: the
         prefix-KV attention concatenates the earlier slices' keys/values with its own, so a
         slice [c, c+l) saves 2·(c+l)·a·d/t elements per layer (the first slice saves nothing
         extra unless grouped-query attention expands its K/V to all heads).
Tokens in flight: 'terapipe' (all forwards, then all backwards) holds every slice of the step;
'token-1f1b' and 'token-interleaved' hold at most min(M, K) micro-batches, because a micro-batch
is released only after its last slice's backward and 1F1B admits at most K.

The copies grow with every extra slice (Σ of slice ends), which is why a cap pushes the planner
towards fewer or earlier cuts. They are additive, so the DP carries them as a budget (dp.Budget).
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
        )

    @property
    def layers_per_stage(self) -> int:
        return math.ceil(self.num_layers / self.pipeline_model_parallel_size)

    def held_bytes_per_token(self) -> float:
        h, t = self.hidden_size, self.tensor_model_parallel_size
        per_layer = 34.0 * h / t if self.sequence_parallel else h * (10.0 + 24.0 / t)
        return per_layer * self.layers_per_stage

    def kv_bytes_per_token(self) -> float:
        """Bytes per token of a saved K/V concatenation (keys and values, all heads), summed
        over the stage's layers."""
        t = self.tensor_model_parallel_size
        heads_dim = self.num_attention_heads * (self.hidden_size // self.num_attention_heads)
        return 2.0 * heads_dim / t * self.bytes_per_element * self.layers_per_stage

    def copy_bytes(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        """Bytes a slice [c, c+l) of `batch` sequences saves beyond its held activations."""
        b, n, c = (np.asarray(x, dtype=np.float64) for x in (batch, slice_len, context_len))
        expands = self.num_query_groups < self.num_attention_heads
        saves = (c > 0) | expands
        return np.where(saves, b * (c + n) * self.kv_bytes_per_token(), 0.0)

    def in_flight(self, schedule: str, batch_slices: tuple[int, ...], num_stages: int
                  ) -> tuple[int, ...]:
        """The batch slices whose activations are all held at the peak."""
        if schedule == "terapipe":
            return tuple(batch_slices)
        return tuple(sorted(batch_slices, reverse=True)[: max(1, num_stages)])

    def held_bytes(
        self, schedule: str, batch_slices: tuple[int, ...], seq_length: int, num_stages: int
    ) -> float:
        tokens = sum(self.in_flight(schedule, batch_slices, num_stages)) * seq_length
        return tokens * self.held_bytes_per_token()

    def peak_bytes(
        self,
        schedule: str,
        batch_slices: tuple[int, ...],
        token_slices_per_batch_slice: tuple[tuple[int, ...], ...],
        num_stages: int,
    ) -> float:
        """Peak of a whole plan: for reporting, and what the planner's budget enforces."""
        seq_length = sum(token_slices_per_batch_slice[0])
        pairs = sorted(zip(batch_slices, token_slices_per_batch_slice), reverse=True)
        if schedule != "terapipe":
            pairs = pairs[: max(1, num_stages)]
        copies = 0.0
        for b, slices in pairs:
            context = 0
            for length in slices:
                copies += float(self.copy_bytes(b, length, context))
                context += length
        return self.held_bytes(schedule, batch_slices, seq_length, num_stages) + copies
