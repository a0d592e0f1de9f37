"""Non-DP slicings to compare against, and the two ways of scoring a slicing.

- equal: equal token counts (what `--token-pipeline-slices N` runs).
- equal-flops: Seq1F1B's split, equal FLOPs per slice. With causal attention a slice after c
  tokens costs α·l + β·(l·c + l(l+1)/2), so later slices are shorter.
- formula score: TeraPipe's Σ t + (K−1)·max t, exact for its GPipe-like schedule.
- simulator score: the makespan of the chosen schedule from the schedule simulator, because
  for 1F1B-style token schedules the step time is not that formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron_terapipe.token_slices import equal_token_slices

Scorer = Callable[[tuple[int, ...]], float]


def equal_flops_slices(
    seq_length: int, num_slices: int, granularity: int, attention_to_linear: float
) -> tuple[int, ...]:
    """Seq1F1B's split: boundaries where cumulative FLOPs reach k/n of the total.

    `attention_to_linear` is β/α: attention FLOPs per (query, key) pair over linear-layer FLOPs
    per token (4h / (2·params per layer) for a GPT layer). Boundaries are rounded to the nearest
    multiple of `granularity` with every slice at least one granule.
    """
    equal_token_slices(seq_length, num_slices, granularity)  # same argument checks and errors
    if attention_to_linear < 0:
        raise ValueError(f"attention_to_linear must be >= 0, got {attention_to_linear}")
    ratio, g, n = float(attention_to_linear), granularity, num_slices

    def work(x: float) -> float:
        return x + ratio * x * (x + 1) / 2.0

    total = work(seq_length)
    bounds = [0]
    for k in range(1, n):
        target = total * k / n
        # Solve x + ratio·x(x+1)/2 = target for x ≥ 0.
        if ratio == 0:
            x = target
        else:
            a, b = ratio / 2.0, 1.0 + ratio / 2.0
            x = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
        x = int(round(x / g)) * g
        lo, hi = bounds[-1] + g, seq_length - (n - k) * g
        bounds.append(min(max(x, lo), hi))
    bounds.append(seq_length)
    return tuple(int(b - a) for a, b in zip(bounds, bounds[1:]))


def attention_to_linear_ratio(model: Any) -> float:
    """β/α of a model with `hidden_size` and `params_per_layer` (AnalyticCostModel)."""
    if not hasattr(model, "params_per_layer") or not hasattr(model, "hidden_size"):
        raise ValueError(
            "the equal-flops strategy needs model dims (hidden size, layer parameters); "
            f"cost model {getattr(model, 'name', model)!r} has none: give model flags too"
        )
    return 4.0 * model.hidden_size / (2.0 * model.params_per_layer)


def slice_counts(units: int, limit: int = 64) -> list[int]:
    """Slice counts worth trying when the count is free: all small ones, the divisors of the
    unit count (equal slices exist there), then geometric steps; at most about `limit`, so
    scoring with the (slower) simulator stays cheap."""
    counts = set(range(1, min(units, 16) + 1))
    counts.update(d for d in range(1, units + 1) if units % d == 0)
    n = 16.0
    while n < units:
        n *= 1.25
        counts.add(min(units, int(round(n))))
    ordered = sorted(counts)
    if len(ordered) > limit:
        picks = np.unique(np.linspace(0, len(ordered) - 1, limit).round().astype(int))
        ordered = [ordered[i] for i in picks]
    return ordered


def formula_scorer(table: np.ndarray, granularity: int, num_stages: int,
                   batch_slices: Sequence[int]) -> Scorer:
    """TeraPipe's step time of one token slicing applied to every batch slice."""
    from megatron_terapipe.slicing.dp import step_objective

    def score(token_slices: tuple[int, ...]) -> float:
        units = tuple(x // granularity for x in token_slices)
        return step_objective(table, num_stages, batch_slices, [units] * len(batch_slices))[0]

    return score


def simulator_scorer(
    cost_model: Any,
    schedule: str,
    num_stages: int,
    num_microbatches: int,
    batch: int,
    num_chunks: int = 1,
    backward_ratio: float | None = None,
    split_backward: bool = False,
    flops_model: Any = None,
) -> Scorer:
    """Makespan from the schedule simulator (imported lazily: it is optional for planning).

    backward_ratio: backward over forward time; by default the cost model's own (a profile
    measures it), else 2. split_backward scores the split schedule, W priced at the FLOP
    model's weight-gradient share of each backward (`weight_grad_fraction`; Zero Bubble's 1/2
    when no model has it).
    """
    if backward_ratio is None:
        backward_ratio = float(getattr(cost_model, "backward_ratio", 2.0))
    try:
        from megatron_terapipe.schedules import build_schedule
        from megatron_terapipe.simulate import ActionCosts, simulate
    except ImportError as exc:
        raise ValueError(
            "scoring with the simulator needs megatron_terapipe.schedules.build_schedule and "
            f"megatron_terapipe.simulate (ActionCosts, simulate): {exc}"
        ) from exc
    costs = ActionCosts.from_stage_cost_model(
        _Memo(cost_model), batch=batch, backward_ratio=backward_ratio, num_chunks=num_chunks
    )
    share_model = flops_model if hasattr(flops_model, "weight_grad_fraction") else cost_model
    if split_backward and hasattr(share_model, "weight_grad_fraction"):
        backward = costs.backward

        def weight_grad(stage: int, chunk: int, length: int, context: int) -> float:
            share = float(share_model.weight_grad_fraction(batch, length, context))
            return share * backward(stage, chunk, length, context)

        costs.weight_grad = weight_grad
    schedules: dict[int, Any] = {}

    def score(token_slices: tuple[int, ...]) -> float:
        n = len(token_slices)
        if n not in schedules:
            schedules[n] = build_schedule(schedule, num_stages, num_microbatches, n, num_chunks,
                                          split_backward=split_backward)
        return float(simulate(schedules[n], list(token_slices), costs).step_time)

    return score


class _Memo:
    """A cost model that answers repeated questions from a dict: the simulator asks the same
    (slice, context) once per stage and micro-batch, and numpy scalar math is slow."""

    def __init__(self, model: Any) -> None:
        self.model, self.name = model, getattr(model, "name", type(model).__name__)
        self._fb: dict[tuple[int, int, int], float] = {}
        self._p2p: dict[tuple[int, int], float] = {}

    def forward_backward_time(self, batch: int, slice_len: int, context_len: int) -> float:
        key = (batch, slice_len, context_len)
        if key not in self._fb:
            self._fb[key] = float(self.model.forward_backward_time(*key))
        return self._fb[key]

    def p2p_time(self, batch: int, slice_len: int) -> float:
        key = (batch, slice_len)
        if key not in self._p2p:
            self._p2p[key] = float(self.model.p2p_time(*key))
        return self._p2p[key]
