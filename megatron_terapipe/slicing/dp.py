"""TeraPipe's Algorithm 1 and its batch-dimension DP, exact, in numpy.

Problem. A step runs units u = (batch slice, token slice) through K stages; TeraPipe's step time
is  T = Σ_u t(u) + (K−1)·max_u t(u),  with t read from a table `table[b, l, c]` (b sequences,
l token units, c units of context; docs/latency_table.md). Each batch slice gets its own token
slicing.

Method. Fix a bound v on max t. Then the best Σ is a shortest path over token positions,
        f_b[i] = min_{j<i, t(b, i−j, j) ≤ v}  f_b[j] + t(b, i−j, j),
and the batch slices combine by a second DP over the batch dimension, giving G(v). Since G is
non-increasing in v and every solution at bound v has max ≤ v,  min_v G(v) + (K−1)·v  over the
distinct table values is the exact optimum. TeraPipe enumerates v upwards and stops once
(K−1)·v alone rules out improvement (`method="ascending"`). The default (`method="bisect"`)
reaches the same optimum with far fewer DPs by skipping candidates that cannot improve:
  * G(v) ≥ G(v_hi) for every v ≤ v_hi, so a run of candidates [v_lo, v_hi) is skipped when
    G(v_hi) + (K−1)·v_lo already reaches the best T found;
  * a DP at bound v returns a solution whose true max m may be < v; then G is flat on [m, v]
    and every candidate in there is dominated by m, which that same DP already scored.
Runs of candidates are split at their middle, most promising first.

Constraints are per slice only (`allowed`, inf entries). The planner's memory cap is not one of
them: peak memory is not additive over slices (it is a walk of the schedule's order,
slicing/memory.py), so the cap filters the DP's candidates instead.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BATCH_MODES = ("free", "uniform", "fixed")


@dataclass
class DPSolution:
    """The optimum in table units: per batch slice, its size and its token slicing."""

    objective: float
    t_max: float
    sum_time: float
    batch_slices: tuple[int, ...]
    token_units: tuple[tuple[int, ...], ...]
    evaluations: int = 0
    candidates: int = 0
    explored: list[tuple[int, tuple[int, ...]]] = field(default_factory=list, repr=False)


class NoFeasiblePlan(ValueError):
    """Every slicing breaks a constraint (a mask or inf entries)."""


def step_objective(
    table: np.ndarray,
    num_stages: int,
    batch_slices: Sequence[int],
    token_units: Sequence[Sequence[int]],
) -> tuple[float, float, float]:
    """(T, Σ t, max t) of a given slicing, straight from the definition."""
    times = []
    for b, units in zip(batch_slices, token_units):
        context = 0
        for length in units:
            times.append(float(table[b, length, context]))
            context += length
    total, worst = float(sum(times)), float(max(times))
    return total + (num_stages - 1) * worst, total, worst


class _Problem:
    """The end-indexed tables of the batch sizes a batch mode can use, plus the batch combiner."""

    def __init__(
        self,
        table: np.ndarray,
        batch_mode: str,
        batch: int | None,
        batch_slices: Sequence[int] | None,
        allowed: np.ndarray | None,
    ) -> None:
        if table.ndim != 3 or table.shape[1] != table.shape[2] or table.shape[1] < 2:
            raise ValueError(f"latency table must have shape [B+1, U+1, U+1], got {table.shape}")
        max_b = table.shape[0] - 1
        self.units = table.shape[1] - 1
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode={batch_mode!r}; valid: {', '.join(BATCH_MODES)}")
        if batch_mode == "fixed":
            if not batch_slices:
                raise ValueError("batch_mode='fixed' needs batch_slices")
            self.fixed = tuple(int(b) for b in batch_slices)
            bad = [b for b in self.fixed if not 1 <= b <= max_b]
            if bad:
                raise ValueError(
                    f"batch slices {bad} are outside the table's batch range 1..{max_b}"
                )
            sizes = sorted(set(self.fixed))
            self.total = sum(self.fixed)
        else:
            self.total = max_b if batch is None else int(batch)
            if not 1 <= self.total <= max_b:
                raise ValueError(f"batch={self.total} is outside the table's range 1..{max_b}")
            if batch_mode == "free":
                sizes = list(range(1, self.total + 1))
            else:
                sizes = [b for b in range(1, self.total + 1) if self.total % b == 0]
        self.mode = batch_mode
        self.sizes = sizes
        rows = np.array(sizes)
        sub = np.array(table[rows], dtype=np.float64)
        if allowed is not None:
            sub = np.where(np.asarray(allowed)[rows], sub, np.inf)
        if np.isnan(sub).any():
            raise ValueError("latency table holds NaN entries")
        # E[r, i, j] = t(b_r, i − j, j): cost of the slice [j, i) ends at i, so the DP over end
        # positions reads one contiguous row per step.
        units = self.units
        end = np.arange(units + 1)[:, None]
        start = np.arange(units + 1)[None, :]
        length = end - start
        ok = length >= 1
        self.E = np.full((len(sizes), units + 1, units + 1), np.inf)
        self.E[:, ok] = sub[:, length[ok], start.repeat(units + 1, 0)[ok]]
        if (self.E < 0).any():
            raise ValueError("latency table holds negative entries")
        self._masked = self._f = None

    # -- token DP ----------------------------------------------------------------------------
    def token_dp(self, bound: float) -> np.ndarray:
        """f[r]: least Σ t over slicings of batch size sizes[r] with every t ≤ bound."""
        masked = np.where(self.E <= bound, self.E, np.inf)
        rows, units = masked.shape[0], self.units
        # [end, start, row], contiguous: each step reads one block; the raw ufunc reduce skips
        # numpy's Python-level wrapper, which dominates at these sizes.
        by_end = np.ascontiguousarray(masked.transpose(1, 2, 0))
        f = np.full((units + 1, rows), np.inf)
        f[0] = 0.0
        reduce, add = np.minimum.reduce, np.add
        for i in range(1, units + 1):
            reduce(add(f[:i], by_end[i, :i]), axis=0, out=f[i])
        self._masked, self._f = masked, f
        return f[units]

    def minimax(self) -> np.ndarray:
        """Per batch size, the least possible max t of a slicing."""
        rows, units = self.E.shape[0], self.units
        m = np.full((units + 1, rows), np.inf)
        m[0] = -np.inf
        for i in range(1, units + 1):
            np.min(np.maximum(m[:i], self.E[:, i, :i].T), axis=0, out=m[i])
        return m[units]

    def path(self, r: int) -> tuple[tuple[int, ...], float]:
        """Slicing of row r from the last token_dp, and its max t."""
        masked, f, i, lengths, worst = self._masked[r], self._f[:, r], self.units, [], 0.0
        while i > 0:
            j = int(np.argmin(f[:i] + masked[i, :i]))
            lengths.append(i - j)
            worst = max(worst, float(masked[i, j]))
            i = j
        return tuple(reversed(lengths)), worst

    # -- batch DP ----------------------------------------------------------------------------
    def combine(self, f_end: np.ndarray) -> tuple[float, tuple[int, ...]]:
        """Best Σ over the batch partitions the mode allows, given each size's best Σ; returns
        it and the parts."""
        cost = dict(zip(self.sizes, f_end.tolist()))
        if self.mode == "fixed":
            return sum(cost[b] for b in self.fixed), self.fixed
        if self.mode == "uniform":
            best = min(self.sizes, key=lambda b: (self.total // b * cost[b], -b))
            return self.total // best * cost[best], (best,) * (self.total // best)
        g = [0.0] + [np.inf] * self.total
        choice = [0] * (self.total + 1)
        for a in range(1, self.total + 1):
            for b in reversed(self.sizes):  # ties go to larger batch slices: fewer units
                if b <= a and g[a - b] + cost[b] < g[a]:
                    g[a], choice[a] = g[a - b] + cost[b], b
        parts, a = [], self.total
        while a > 0 and np.isfinite(g[self.total]):
            parts.append(choice[a])
            a -= choice[a]
        return g[self.total], tuple(sorted(parts, reverse=True))

    def min_bound(self) -> float:
        """Least v with a feasible plan (minimax DP over token, then batch slices)."""
        mm = dict(zip(self.sizes, self.minimax().tolist()))
        if self.mode == "fixed":
            return max(mm[b] for b in self.fixed)
        if self.mode == "uniform":
            return min(mm.values())
        h = [-np.inf] + [np.inf] * self.total
        for a in range(1, self.total + 1):
            h[a] = min(max(h[a - b], mm[b]) for b in self.sizes if b <= a)
        return h[self.total]


def solve(
    table: np.ndarray,
    num_stages: int,
    *,
    batch_mode: str = "free",
    batch: int | None = None,
    batch_slices: Sequence[int] | None = None,
    allowed: np.ndarray | None = None,
    method: str = "bisect",
    keep_explored: bool = False,
) -> DPSolution:
    """Exact minimum of Σ t + (K−1)·max t over batch and token slicings of `table`.

    batch_mode: 'free' splits `batch` (default: the table's B) into any batch slices (TeraPipe);
    'uniform' only into equal ones (what Megatron's equal micro-batches can run); 'fixed' takes
    `batch_slices` as given (copies of one size share one slicing). `allowed` (bool,
    table-shaped) forbids entries.
    `keep_explored` records every (batch size, slicing) the search solved, for re-scoring.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if method not in ("bisect", "ascending"):
        raise ValueError(f"method={method!r}; valid: bisect, ascending")
    prob = _Problem(np.asarray(table), batch_mode, batch, batch_slices, allowed)
    weight = float(num_stages - 1)
    finite = prob.E[np.isfinite(prob.E)]
    values = np.unique(finite)
    lowest = prob.min_bound()
    if not np.isfinite(lowest):
        raise NoFeasiblePlan("no slicing satisfies the constraints (entries inf or masked)")
    values = values[values >= lowest]
    state: dict = {"best": None, "evals": 0, "explored": []}

    def evaluate(bound: float) -> tuple[float, float]:
        """G(bound) and the true max of the solution found; records it if it is the best."""
        f_end = prob.token_dp(bound)
        total, parts = prob.combine(f_end)
        state["evals"] += 1
        if not np.isfinite(total):
            return np.inf, np.inf
        found = {b: prob.path(prob.sizes.index(b)) for b in set(parts)}
        slicings = [found[b] for b in parts]
        worst = max(w for _, w in slicings)
        objective = total + weight * worst
        if keep_explored:
            state["explored"].extend((b, found[b][0]) for b in found)
        best = state["best"]
        if best is None or objective < best.objective:
            state["best"] = DPSolution(
                objective, worst, total, parts, tuple(s for s, _ in slicings)
            )
        return total, worst

    def index_of(value: float) -> int:
        return int(np.searchsorted(values, value, side="left"))

    if method == "ascending" or weight == 0.0:
        g_inf, _ = evaluate(np.inf)
        for v in values:
            if state["best"] is not None and weight * v + g_inf >= state["best"].objective:
                break
            evaluate(float(v))
    else:
        evaluate(float(values[0]))
        g_hi, m_hi = evaluate(np.inf)
        heap: list[tuple[float, int, int, float]] = []

        def push(i: int, j: int, g_j: float) -> None:
            # Interior i+1..j-1 has G ≥ G(values[j]) and bound ≥ values[i+1].
            if j - i > 1:
                heapq.heappush(heap, (g_j + weight * float(values[i + 1]), i, j, g_j))

        push(0, index_of(m_hi), g_hi)
        while heap:
            bound, i, j, g_j = heapq.heappop(heap)
            if bound >= state["best"].objective:
                break
            mid = (i + j) // 2
            g_mid, m_mid = evaluate(float(values[mid]))
            k = max(index_of(m_mid), i)
            push(i, k, g_mid)
            push(mid, j, g_j)

    best = state["best"]
    if best is None:
        raise NoFeasiblePlan("no feasible slicing")
    best.evaluations = state["evals"]
    best.candidates = int(values.size)
    best.explored = state["explored"]
    return best


def slicings_at_bounds(
    table: np.ndarray, batch_size: int, count: int = 16, allowed: np.ndarray | None = None,
) -> list[tuple[int, ...]]:
    """Least-Σ slicings of one batch size under `count` bounds spread over the useful range.

    For scorers other than TeraPipe's formula (the simulator) the formula's pruning proves
    nothing, so they get these as extra candidates: from the finest useful slicing (least
    possible max) to the unconstrained one.
    """
    prob = _Problem(np.asarray(table), "fixed", None, (batch_size,), allowed)
    finite = prob.E[np.isfinite(prob.E)]
    values = np.unique(finite)
    lowest = prob.min_bound()
    if not np.isfinite(lowest):
        raise NoFeasiblePlan("no slicing satisfies the constraints")
    prob.token_dp(np.inf)
    _, highest = prob.path(0)
    values = values[(values >= lowest) & (values <= highest)]
    picks = np.unique(np.linspace(0, values.size - 1, min(count, values.size)).round().astype(int))
    found = []
    for v in values[picks]:
        total, _ = prob.combine(prob.token_dp(float(v)))
        if not np.isfinite(total):
            continue
        slicing, _ = prob.path(0)
        if slicing not in found:
            found.append(slicing)
    return found
