"""Non-DP slicings to compare against, and the two ways of scoring a slicing.

- equal: equal token counts (what `--token-pipeline-slices N` runs).
- equal-flops: Seq1F1B's computation-wise split, FLOPs per slice as equal as whole granules
  allow. On the analytic model's count a slice of l tokens after c costs α·l + β·l·(c + l),
  so later slices are shorter.
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
    """Seq1F1B's computation-wise split: slices whose FLOPs are as equal as whole granules allow.

    Equal token counts overload the late slices (their queries see more keys), TeraPipe's DP
    optimises a step-time model instead; this is the split a peer method runs, so the
    benchmarks can set it beside ours. A slice's FLOPs are `AnalyticCostModel.forward_flops`,
    the planner's own count, over the linear FLOPs of one token (`slice_flops`): l tokens ending
    at token e cost l·(1 + ρ·e), ρ = `attention_to_linear` (`attention_to_linear_ratio`); the
    kernel computes each slice's masked square too, so a slice's queries meet all e keys.

    "As equal as allowed" is exact, not a rounding of ideal boundaries: the largest slice FLOPs
    is the least of any split into `num_slices` multiples of `granularity` (the pipeline's pace
    is its costliest slice); among those splits the smallest slice FLOPs is the largest
    possible; the remaining ties go to the longest slices first. That split is non-increasing:
    lengthening an earlier, shorter slice by a granule at the expense of the later, longer one
    never raises the pair's larger cost nor lowers its smaller one.
    """
    equal_token_slices(seq_length, num_slices, granularity)  # same argument checks and errors
    ratio = float(attention_to_linear)
    if not (ratio >= 0 and math.isfinite(ratio)):
        raise ValueError(f"attention_to_linear must be a finite number >= 0, got "
                         f"{attention_to_linear!r}")
    units = seq_length // granularity
    if num_slices in (1, units):
        return equal_token_slices(seq_length, num_slices, granularity)
    flops = _SliceFlops(units, granularity, ratio)
    return flops.balanced_split(num_slices, flops.smallest_max(num_slices))


def slice_flops(token_slices: Sequence[int], attention_to_linear: float) -> list[float]:
    """Per slice, the FLOPs `equal_flops_slices` equalises, in linear FLOPs of one token:
    l·(1 + ρ·e) for l tokens ending at token e (forward_flops / (2·params per layer))."""
    out, end = [], 0
    for length in token_slices:
        end += int(length)
        out.append(length * (1.0 + float(attention_to_linear) * end))
    return out


def attention_to_linear_ratio(model: Any) -> float:
    """β/α of a model with `hidden_size` and `params_per_layer` (AnalyticCostModel): attention
    FLOPs per (query, key) pair, 4h, over linear FLOPs per token, 2·params per layer; both
    scale with batch and tensor parallelism alike, so only the model dims matter."""
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


class _SliceFlops:
    """FLOPs of the slice from granule i to granule j (over the linear FLOPs of one token):
    w(i, j) = g·(j - i)·(1 + ρ·g·j). For a fixed end it falls as the start moves right, for a
    fixed start it rises with the end; both searches below rest on that."""

    def __init__(self, units: int, granularity: int, ratio: float) -> None:
        self.units, self.g, self.ratio = units, float(granularity), ratio

    def cost(self, i: Any, j: Any) -> Any:
        return self.g * (j - i) * (1.0 + self.ratio * self.g * j)

    def last_end(self, i: np.ndarray, limit: float, strict: bool = False) -> np.ndarray:
        """Per start i, the last end j in [i, U] with w(i, j) <= limit (< limit if strict)."""
        g, r, units = self.g, self.ratio, self.units
        i = np.asarray(i, dtype=np.int64)
        base = g * i.astype(np.float64) + limit  # g·j + r·g²·j² − r·g²·i·j = g·i + limit
        if r == 0.0:
            root = base / g
        else:
            a, b = r * g * g, g * (1.0 - r * g * i)
            disc = np.sqrt(b * b + 4.0 * a * base)
            with np.errstate(divide="ignore", invalid="ignore"):
                root = np.where(b < 0, (disc - b) / (2.0 * a), 2.0 * base / (b + disc))
        j = np.clip(np.floor(root), i, units).astype(np.int64)

        def within(end: np.ndarray) -> np.ndarray:
            w = self.cost(i, end)
            return w < limit if strict else w <= limit

        # The root is within a granule or two of the answer; step to it exactly.
        while True:
            up = (j < units) & within(np.minimum(j + 1, units))
            down = (j > i) & ~within(j)
            if not (up.any() or down.any()):
                return j
            j = j + up - down

    def _last_end(self, i: int, limit: float) -> int:
        """`last_end` for one start, in plain floats (the greedy calls it once per slice)."""
        g, r, units = self.g, self.ratio, self.units
        base = g * i + limit
        if r == 0.0:
            root = base / g
        else:
            a, b = r * g * g, g * (1.0 - r * g * i)
            disc = math.sqrt(b * b + 4.0 * a * base)
            root = (disc - b) / (2.0 * a) if b < 0 else 2.0 * base / (b + disc)
        j = min(max(int(math.floor(root)), i), units)
        while j < units and self.cost(i, j + 1) <= limit:
            j += 1
        while j > i and self.cost(i, j) > limit:
            j -= 1
        return j

    def greedy(self, limit: float, most: int) -> list[int] | None:
        """Ends of the split taking every slice as long as `limit` allows, or None if that
        needs more than `most` slices. No split under `limit` needs fewer slices: its k-th end
        is never past the greedy one's (a slice shrunk from the left costs less)."""
        ends, i = [], 0
        while i < self.units:
            j = self._last_end(i, limit)
            if j == i or len(ends) == most:
                return None
            ends.append(j)
            i = j
        return ends

    def smallest_max(self, n: int) -> float:
        """The least largest-slice FLOPs of any split into at most (so exactly: a slice cut in
        two costs less) n slices: a bisection over the limit, each feasible limit replaced by
        the greedy split's own largest slice, until no float lies between an infeasible limit
        and a feasible one."""
        low, high = 0.0, float(self.cost(0, self.units))
        while True:
            mid = 0.5 * (low + high)
            if not low < mid < high:
                return high
            ends = self.greedy(mid, n)
            if ends is None:
                low = mid
            else:
                high = max(float(self.cost(i, j)) for i, j in zip([0, *ends[:-1]], ends))

    def balanced_split(self, n: int, top: float) -> tuple[int, ...]:
        """Among the splits into n slices none above `top`, the one whose smallest slice is
        largest (ties: longest slices first), as token lengths.

        Slices of a near-equal split cost within a granule or so of each other, so the search
        first allows only slices in a narrow band under `top` and widens it until some split
        fits: a split found in a band is optimal, since the best split's slices all cost at
        least its smallest, which is no less than the band's floor."""
        share = min(1.0, 4.0 * n / self.units)
        while True:
            split = self._best_in_band(n, top, 0.0 if share >= 1.0 else top * (1.0 - share))
            if split is not None:
                return split
            share *= 4.0

    def _best_in_band(self, n: int, top: float, low: float) -> tuple[int, ...] | None:
        """The longest-first split with the greatest smallest slice among the splits into n
        slices that all cost within [low, top]; None if there is none.

        A bottleneck DP over the allowed slices (from each start, one run of ends):
        best[k][i] is the greatest smallest-slice FLOPs of k slices covering granules i..;
        each of its n steps is one pass over the allowed slices. A second run keeps, per
        step, only which starts reach the optimum, to walk the longest-first split out."""
        units = self.units
        starts = np.arange(units)
        last = self.last_end(starts, top)
        begin = np.maximum(self.last_end(starts, low, strict=True), starts) + 1
        lengths = np.maximum(last - begin + 1, 0)  # allowed ends of each start: begin..last
        first = np.cumsum(lengths) - lengths  # where each start's slices begin in the lists
        owner = np.repeat(starts, lengths)
        ends = np.repeat(begin, lengths) + np.arange(lengths.sum()) - np.repeat(first, lengths)
        cost = self.cost(owner, ends)
        has = lengths > 0
        offsets = first[has]

        def step(best: np.ndarray) -> np.ndarray:
            out = np.full(units + 1, -np.inf)
            if offsets.size:
                out[:units][has] = np.maximum.reduceat(np.minimum(cost, best[ends]), offsets)
            return out

        best = np.full(units + 1, -np.inf)
        best[units] = np.inf  # no slice left to cover: no smallest slice to bound
        for _ in range(n):
            best = step(best)
        floor = best[0]  # a min of listed costs: the walk below compares it exactly
        if floor == -np.inf:
            return None
        reach, best = [], np.full(units + 1, -np.inf)
        best[units] = np.inf
        for _ in range(n - 1):
            best = step(best)
            reach.append(best >= floor)
        out, i = [], 0
        for k in range(n - 1, -1, -1):
            lo, hi = first[i], first[i] + lengths[i]
            fits = cost[lo:hi] >= floor
            fits &= reach[k - 1][ends[lo:hi]] if k else ends[lo:hi] == units
            j = int(ends[lo + np.flatnonzero(fits)[-1]])
            out.append((j - i) * int(self.g))
            i = j
        return tuple(out)
