"""From a cost model to a SlicingPlan: table, constraints, strategy, scoring.

The DP itself is in `dp.py`; this module decides what it is asked:

- granularity: slices are multiples of g tokens (and of the TP size under sequence parallelism);
  the table has U = seq_length / g units. Left unset, g is the smallest valid value that keeps
  U ≤ 256, which the DP solves well under a second.
- batch: 'free' splits the batch B into any batch slices, each with its own token slicing
  (TeraPipe); 'uniform' only into equal slices (what Megatron's equal micro-batches can run);
  'fixed' plans `num_microbatches` micro-batches of `batch` sequences each, one token slicing
  for all of them (what `plan_from_args` asks).
- memory cap: every candidate's peak comes from the memory model's walk of the schedule it
  would run (memory.py); the DP's optimum is kept when it fits. Otherwise the best fitting
  candidate under the score wins, among the DP's explored and bound-swept slicings, the equal
  ones and the DP's optima with the last slice at least k units or the first at most k (k
  bisected), for the DP's batch split and every uniform one. Without attention dropout
  terapipe's peak depends on its last slice only (the accumulators of the first backward
  against what that slice frees), which makes the plan exact there for each split; 1F1B orders
  also hold the first slices of later micro-batches, and attention-dropout masks grow with each
  slice's context, so there the plan only beats every fitting equal slicing.
- strategy: 'dp' (TeraPipe's Algorithm 1), 'equal' or 'equal-flops' (Seq1F1B); the last two take
  `num_slices` or, when it is None, the best count under the score.
- score: 'formula' (TeraPipe's Σ t + (K−1)·max t) or 'simulator' (the schedule simulator's
  makespan of `schedule`); with the simulator the DP's candidates, a sweep of t_max bounds and
  the equal strategies' slicings are ranked by the formula, the best `simulator_candidates`
  are simulated together with every equal slicing of up to ALWAYS_SIMULATED_EQUAL slices, and
  the fastest is kept (simulations cost far more than formula scores).

Whatever the score, the plan carries its own TeraPipe objective (`objective`) and, when it was
simulated, its simulated step time apart (`simulated_step_time`); when the simulator keeps a
plan other than the DP's, the DP's optimum stays in `extra` (`dp_token_slices`, `dp_objective`),
so a printed number is never of a different plan than the printed slices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from megatron_terapipe.slicing import dp
from megatron_terapipe.slicing.cost_models import build_latency_table, divisors
from megatron_terapipe.slicing.latency_table import LatencyTableCostModel
from megatron_terapipe.slicing.memory import GIB, ActivationMemoryModel
from megatron_terapipe.slicing.plan import SlicingPlan
from megatron_terapipe.slicing.strategies import (
    attention_to_linear_ratio,
    equal_flops_slices,
    formula_scorer,
    simulator_scorer,
    slice_counts,
)
from megatron_terapipe.token_slices import (
    equal_token_slices,
    granularity_problem,
    validate_token_slices,
)

STRATEGIES = ("dp", "equal", "equal-flops")
SCORES = ("formula", "simulator")
# Equal slicings up to this count are always simulated, whatever the formula's shortlist: the
# plan is then never predicted slower than the equal slicing a user would try by hand.
ALWAYS_SIMULATED_EQUAL = 16
MAX_UNITS = 4096  # (U+1)² table entries per batch size: 134 MB of float64 at this bound


def default_granularity(seq_length: int, multiple_of: int = 1, max_units: int = 256) -> int:
    """Smallest g that is a multiple of `multiple_of`, divides seq_length and gives ≤ max_units."""
    check_granularity(multiple_of, seq_length, multiple_of, flag="multiple_of")
    for g in range(multiple_of, seq_length + 1, multiple_of):
        if seq_length % g == 0 and seq_length // g <= max_units:
            return g
    return seq_length


def check_granularity(
    granularity: int,
    seq_length: int,
    multiple_of: int = 1,
    flag: str = "granularity",
    seq_flag: str = "seq_length",
    multiple_flag: str = "the tensor-model-parallel size",
) -> int:
    """`granularity` as an int, or ValueError with `token_slices.granularity_problem`'s message
    (the rule the argument check applies too), worded with the caller's names."""
    problem = granularity_problem(granularity, seq_length, multiple_of, flag, seq_flag,
                                  multiple_flag)
    if problem is not None:
        raise ValueError(problem)
    return int(granularity)


def make_plan(
    cost_model: Any,
    *,
    seq_length: int,
    num_stages: int,
    batch: int = 1,
    granularity: int | None = None,
    multiple_of: int = 1,
    strategy: str = "dp",
    num_slices: int | None = None,
    batch_mode: str = "free",
    num_microbatches: int = 1,
    memory: ActivationMemoryModel | None = None,
    memory_cap_gib: float | None = None,
    schedule: str = "terapipe",
    score: str = "formula",
    num_chunks: int = 1,
    include_p2p: bool = True,
    flops_model: Any = None,
    method: str = "bisect",
    simulator_candidates: int = 12,
    split_backward: bool = False,
) -> SlicingPlan:
    """Plan token (and batch) slices for one pipeline of `num_stages` stages."""
    started = time.perf_counter()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")
    if score not in SCORES:
        raise ValueError(f"score={score!r}; valid: {', '.join(SCORES)}")
    if num_stages < 1:
        raise ValueError(f"pipeline stages must be >= 1, got {num_stages}")
    if batch < 1 or num_microbatches < 1:
        raise ValueError(
            f"batch and num_microbatches must be >= 1, got {batch} and {num_microbatches}"
        )
    if granularity is None:
        granularity = default_granularity(seq_length, multiple_of)
        if isinstance(cost_model, LatencyTableCostModel):
            granularity = math.lcm(granularity, cost_model.granularity)
    g = check_granularity(granularity, seq_length, multiple_of)
    if seq_length // g > MAX_UNITS:
        raise ValueError(
            f"granularity={g} cuts seq_length={seq_length} into {seq_length // g} units; the "
            f"planner's table grows with the square of that: use a granularity of at least "
            f"{-(-seq_length // MAX_UNITS)} (at most {MAX_UNITS} units)"
        )
    if score == "simulator" and batch_mode == "free":
        batch_mode = "uniform"  # the executor runs equal micro-batches, so does the simulator

    table = _table(cost_model, batch, seq_length, g, include_p2p)
    fixed = (batch,) * num_microbatches if batch_mode == "fixed" else None
    cap = _cap_bytes(memory, memory_cap_gib)
    peaks: dict[tuple, float] = {}
    schedules: dict = {}  # the IR by shape, across the candidates' peaks

    def peak_of(batch_slices: tuple[int, ...], per_slice: tuple[tuple[int, ...], ...]) -> float:
        key = (batch_slices, per_slice)
        if key not in peaks:
            peaks[key] = memory.peak_bytes(schedule, batch_slices, per_slice, num_stages,
                                           split_backward=split_backward, schedules=schedules)
        return peaks[key]

    def fits(batch_slices: tuple[int, ...], slices: tuple[int, ...]) -> bool:
        return cap is None or peak_of(batch_slices, (slices,) * len(batch_slices)) <= cap

    def no_fit(tried: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> ValueError:
        smallest = min(peak_of(split, (c,) * len(split)) for split, c in tried)
        return ValueError(_no_fit(smallest, memory_cap_gib, len(set(tried))))

    extra: dict[str, Any] = {
        "granularity": g,
        "num_stages": num_stages,
        "schedule": schedule,
        "score": score,
        "batch_mode": batch_mode,
    }
    if cap is not None:
        extra["memory_cap_gib"] = memory_cap_gib

    if strategy == "dp":
        sol = dp.solve(table, num_stages, batch_mode=batch_mode, batch=batch,
                       batch_slices=fixed, method=method,
                       keep_explored=score == "simulator" or cap is not None)
        batch_slices = sol.batch_slices
        per_slice = tuple(tuple(u * g for u in units) for units in sol.token_units)
        token_slices, step, t_max = per_slice[0], sol.objective, sol.t_max
        objective, simulated = sol.objective, math.nan
        extra.update(dp_evaluations=sol.evaluations, dp_candidates=sol.candidates)
        if len(set(per_slice)) > 1:
            extra["token_slices_per_batch_slice"] = [list(s) for s in per_slice]
        dp_peak = peak_of(batch_slices, per_slice) if cap is not None else 0.0
        over_cap = cap is not None and dp_peak > cap
        if score == "simulator" or over_cap:
            equal = _strategy_candidates("equal", seq_length, g, None, cost_model, flops_model)
            shared = equal + _strategy_candidates("equal-flops", seq_length, g, None,
                                                  cost_model, flops_model, quiet=True)
            splits = [batch_slices]
            if over_cap and batch_mode != "fixed":
                # Another batch split may fit where the DP's does not.
                splits += [split for split in ((d,) * (batch // d) for d in divisors(batch))
                           if split != batch_slices]
            best, tried = None, []
            for split in splits:
                b = split[0]
                candidates = [tuple(u * g for u in s) for size, s in sol.explored if size == b]
                candidates += [tuple(u * g for u in s) for s in dp.slicings_at_bounds(table, b)]
                candidates += shared
                if over_cap:
                    candidates += _capped_optima(table, g, split, fits, num_stages, method)
                tried += [(split, c) for c in candidates]
                formula = formula_scorer(table, g, num_stages, split)
                scorer = (formula if score == "formula" else
                          _scorer(score, cost_model, table, g, num_stages, split, schedule,
                                  num_chunks, split_backward, flops_model))
                found = _best(candidates, split, fits, scorer, formula,
                              simulator_candidates if score == "simulator" else None,
                              always=[e for e in equal if len(e) <= ALWAYS_SIMULATED_EQUAL])
                if found is not None and (best is None or found[1] < best[2]):
                    best = (split, found[0], found[1])
            if best is None:
                raise no_fit(tried)
            batch_slices, token_slices, step = best
            per_slice = (token_slices,) * len(batch_slices)
            dp_slices = tuple(u * g for u in sol.token_units[0])
            objective = formula_scorer(table, g, num_stages, batch_slices)(token_slices)
            simulated = step if score == "simulator" else math.nan
            if over_cap:
                extra.pop("token_slices_per_batch_slice", None)
            if token_slices != dp_slices or batch_slices != sol.batch_slices:
                # Another plan than the DP's optimum of the objective was kept (by the
                # simulator, or by the cap): the optimum stays beside it.
                extra.update(dp_token_slices=list(dp_slices), dp_objective=sol.objective)
                extra.pop("token_slices_per_batch_slice", None)
            if over_cap:
                extra["memory_cap_note"] = (
                    f"the DP's optimum needs {dp_peak / GIB:.4f} GiB, over the cap; the best "
                    "fitting candidate was kept")
            t_max = _t_max(table, g, batch_slices, token_slices)
    else:
        batch_slices = fixed or (batch,)
        candidates = _strategy_candidates(strategy, seq_length, g, num_slices, cost_model,
                                          flops_model)
        scorer = _scorer(score, cost_model, table, g, num_stages, batch_slices, schedule,
                         num_chunks, split_backward, flops_model)
        found = _best(candidates, batch_slices, fits, scorer,
                      formula_scorer(table, g, num_stages, batch_slices),
                      simulator_candidates if score == "simulator" else None)
        if found is None:
            raise no_fit([(batch_slices, c) for c in candidates])
        token_slices, step = found
        per_slice = (token_slices,) * len(batch_slices)
        t_max = _t_max(table, g, batch_slices, token_slices)
        objective = formula_scorer(table, g, num_stages, batch_slices)(token_slices)
        simulated = step if score == "simulator" else math.nan

    validate_token_slices(token_slices, seq_length, g, "planned token slices")
    if memory is not None:
        extra["activation_memory_gib"] = round(peak_of(batch_slices, per_slice) / GIB, 4)
    extra["solve_time_s"] = round(time.perf_counter() - started, 4)
    return SlicingPlan(
        token_slices=token_slices,
        batch_slices=batch_slices,
        predicted_step_time=step,
        t_max=t_max,
        strategy=strategy,
        cost_model=getattr(cost_model, "name", type(cost_model).__name__),
        extra=extra,
        objective=objective,
        simulated_step_time=simulated,
    )


def predict_step_time(
    cost_model: Any,
    token_slices: tuple[int, ...],
    num_stages: int,
    batch_slices: tuple[int, ...] = (1,),
    include_p2p: bool = True,
) -> tuple[float, float]:
    """(TeraPipe step time, t_max) of a given slicing, straight from the cost model (no table,
    so any slice lengths work)."""
    times = []
    for b in batch_slices:
        context = 0
        for length in token_slices:
            t = float(cost_model.forward_backward_time(b, length, context))
            if include_p2p:
                t += 2.0 * float(cost_model.p2p_time(b, length))
            times.append(t)
            context += length
    return sum(times) + (num_stages - 1) * max(times), max(times)


# -- helpers ---------------------------------------------------------------------------------
def _table(cost_model: Any, batch: int, seq_length: int, g: int, include_p2p: bool) -> np.ndarray:
    if isinstance(cost_model, LatencyTableCostModel):
        if cost_model.seq_length != seq_length:
            raise ValueError(
                f"the latency table {cost_model.source} is for seq_length="
                f"{cost_model.seq_length}, not {seq_length}"
            )
        if cost_model.max_batch < batch:
            raise ValueError(
                f"the latency table {cost_model.source} covers batch 1..{cost_model.max_batch}, "
                f"the plan needs {batch}"
            )
        return cost_model.table(g, include_p2p)[: batch + 1]
    return build_latency_table(cost_model, batch, seq_length, g, include_p2p)


def _cap_bytes(memory: ActivationMemoryModel | None, cap_gib: float | None) -> float | None:
    """The cap in bytes, checked: a cap needs the model that prices plans against it."""
    if cap_gib is None:
        return None
    if memory is None:
        raise ValueError("a memory cap needs the model dims for the activation-memory model")
    if not cap_gib > 0:
        raise ValueError(f"memory cap must be > 0 GiB, got {cap_gib}")
    return cap_gib * GIB


def _capped_optima(table: np.ndarray, g: int, batch_slices: tuple[int, ...],
                   fits: Callable[[tuple[int, ...], tuple[int, ...]], bool], num_stages: int,
                   method: str) -> list[tuple[int, ...]]:
    """The DP's optima (for `batch_slices`, on the step's objective) with the last slice at
    least k units, for the least k that fits, and with the first slice at most k units, for
    the largest k that fits."""
    units = table.shape[1] - 1
    lengths = np.arange(units + 1)[None, :, None]
    contexts = np.arange(units + 1)[None, None, :]
    found: list[tuple[int, ...]] = []

    def optimum(allowed: np.ndarray) -> tuple[int, ...] | None:
        try:
            sol = dp.solve(table, num_stages, batch_mode="fixed", batch_slices=batch_slices,
                           allowed=allowed, method=method)
        except dp.NoFeasiblePlan:
            return None
        return tuple(u * g for u in sol.token_units[0])

    def candidate(family: str, k: int) -> tuple[int, ...] | None:
        if family == "last":
            allowed = ~((lengths + contexts == units) & (lengths < k))
        else:
            allowed = ~((contexts == 0) & (lengths > k))
        return optimum(np.broadcast_to(allowed, table.shape))

    for family in ("last", "first"):
        # last: larger k fits better; first: smaller k does. Bisect for the loosest that fits.
        lo, hi = 1, units
        best = None
        while lo <= hi:
            k = (lo + hi) // 2
            slices = candidate(family, k)
            ok = slices is not None and fits(batch_slices, slices)
            if ok:
                best = slices
            if ok == (family == "last"):
                hi = k - 1
            else:
                lo = k + 1
        if best is not None:
            found.append(best)
    return found


def _no_fit(smallest: float, cap_gib: float, tried: int) -> str:
    return (
        f"no plan fits: smallest needs {smallest / GIB:.3f} GiB (cap {cap_gib:g} GiB) of "
        f"activations per stage, of the {tried} slicings the planner tried; raise the memory "
        "cap, the tensor-model-parallel size or the number of pipeline stages, or lower the "
        "batch"
    )


def _strategy_candidates(
    strategy: str,
    seq_length: int,
    g: int,
    num_slices: int | None,
    cost_model: Any,
    flops_model: Any,
    quiet: bool = False,
) -> list[tuple[int, ...]]:
    counts = [num_slices] if num_slices is not None else slice_counts(seq_length // g)
    if strategy == "equal":
        return [equal_token_slices(seq_length, n, g) for n in counts]
    try:
        ratio = attention_to_linear_ratio(flops_model or cost_model)
    except ValueError:
        if quiet:
            return []
        raise
    return [equal_flops_slices(seq_length, n, g, ratio) for n in counts]


def _scorer(score: str, cost_model: Any, table: np.ndarray, g: int, num_stages: int,
            batch_slices: tuple[int, ...], schedule: str, num_chunks: int,
            split_backward: bool = False, flops_model: Any = None) -> Any:
    if score == "formula":
        return formula_scorer(table, g, num_stages, batch_slices)
    if len(set(batch_slices)) != 1:
        raise ValueError(f"simulator scoring needs equal batch slices, got {batch_slices}")
    return simulator_scorer(cost_model, schedule, num_stages, len(batch_slices),
                            batch_slices[0], num_chunks, split_backward=split_backward,
                            flops_model=flops_model)


def _best(candidates: list[tuple[int, ...]], batch_slices: tuple[int, ...],
          fits: Callable[[tuple[int, ...], tuple[int, ...]], bool],
          scorer: Callable[[tuple[int, ...]], float],
          prefilter: Callable[[tuple[int, ...]], float] | None = None,
          shortlist: int | None = None, always: list[tuple[int, ...]] = (),
          ) -> tuple[tuple[int, ...], float] | None:
    """Best fitting candidate under `scorer` (None: none fits); with `shortlist`, only that
    many fitting ones, in `prefilter` order, plus the `always` candidates. Memory is checked
    lazily, in score order, since a peak costs a walk of the schedule."""
    unique = list(dict.fromkeys(candidates))  # in order
    if shortlist is None:
        scored = sorted((scorer(s), index, s) for index, s in enumerate(unique))
        for value, _, slices in scored:
            if fits(batch_slices, slices):
                return slices, value
        return None
    ordered = sorted(unique, key=prefilter) if len(unique) > shortlist else unique
    pool: list[tuple[int, ...]] = []
    for slices in ordered:
        if len(pool) >= shortlist:
            break
        if fits(batch_slices, slices):
            pool.append(slices)
    pool += [s for s in dict.fromkeys(always) if s not in pool and fits(batch_slices, s)]
    best: tuple[float, tuple[int, ...]] | None = None
    for slices in pool:
        value = scorer(slices)
        if best is None or value < best[0]:
            best = (value, slices)
    return None if best is None else (best[1], best[0])


def _t_max(table: np.ndarray, g: int, batch_slices: tuple[int, ...],
           slices: tuple[int, ...]) -> float:
    worst, context = 0.0, 0
    for length in slices:
        for b in set(batch_slices):
            worst = max(worst, float(table[b, length // g, context // g]))
        context += length
    return worst
