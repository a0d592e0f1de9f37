"""From a cost model to a SlicingPlan: table, constraints, strategy, scoring.

The DP itself is in `dp.py`; this module decides what it is asked:

- granularity: slices are multiples of g tokens (and of the TP size under sequence parallelism);
  the table has U = seq_length / g units. Left unset, g is the smallest valid value that keeps
  U ≤ 256, which the DP solves well under a second.
- batch: 'free' splits the batch B into any batch slices, each with its own token slicing
  (TeraPipe); 'uniform' only into equal slices (what Megatron's equal micro-batches can run);
  'fixed' plans `num_microbatches` micro-batches of `batch` sequences each, one token slicing
  for all of them (what `plan_from_args` asks).
- memory cap: held activations are fixed by the batch and schedule; the K/V copies each slice
  saves are additive, so the DP carries them as a budget (see memory.py, dp.Budget).
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
from megatron_terapipe.token_slices import equal_token_slices, validate_token_slices

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
    granularity: int, seq_length: int, multiple_of: int = 1, flag: str = "granularity"
) -> int:
    g = int(granularity)
    if g < 1 or seq_length % g:
        valid = [d for d in divisors(seq_length) if d % multiple_of == 0]
        raise ValueError(
            f"{flag}={granularity} does not divide seq_length={seq_length}; valid values: "
            f"{_shorten(valid)}"
        )
    if g % multiple_of:
        raise ValueError(
            f"{flag}={granularity} must be a multiple of the tensor-model-parallel size "
            f"{multiple_of} under sequence parallelism (every TP rank holds an equal share of a "
            "slice)"
        )
    return g


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
    memory_quanta: int = 512,
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
    budget, cap_note = _memory_budget(
        memory, memory_cap_gib, table, batch_mode, batch, fixed, seq_length, g, num_stages,
        schedule, memory_quanta,
    )
    smallest = cap_note.pop("_smallest", None)

    def fits(batch_slices: tuple[int, ...], slices: tuple[int, ...]) -> bool:
        if budget is None:
            return True
        peak = memory.peak_bytes(schedule, batch_slices, (slices,) * len(batch_slices),
                                 num_stages)
        return peak <= memory_cap_gib * GIB
    extra: dict[str, Any] = {
        "granularity": g,
        "num_stages": num_stages,
        "schedule": schedule,
        "score": score,
        "batch_mode": batch_mode,
    }
    extra.update(cap_note)

    if strategy == "dp":
        try:
            sol = dp.solve(table, num_stages, batch_mode=batch_mode, batch=batch,
                           batch_slices=fixed, budget=budget, method=method,
                           keep_explored=score == "simulator")
        except dp.NoFeasiblePlan:
            if smallest is None:
                raise
            raise ValueError(_no_fit(smallest, memory_cap_gib) + " (with the planner's "
                             f"rounding to 1/{memory_quanta} of the headroom)") from None
        batch_slices = sol.batch_slices
        per_slice = tuple(tuple(u * g for u in units) for units in sol.token_units)
        token_slices, step, t_max = per_slice[0], sol.objective, sol.t_max
        objective, simulated = sol.objective, math.nan
        extra.update(dp_evaluations=sol.evaluations, dp_candidates=sol.candidates)
        if len(set(per_slice)) > 1:
            extra["token_slices_per_batch_slice"] = [list(s) for s in per_slice]
        if score == "simulator":
            b = batch_slices[0]
            candidates = [tuple(u * g for u in s) for size, s in sol.explored if size == b]
            candidates += [tuple(u * g for u in s)
                           for s in dp.slicings_at_bounds(table, b, budget=budget)]
            equal = _strategy_candidates("equal", seq_length, g, None, cost_model, flops_model)
            candidates += equal
            candidates += _strategy_candidates("equal-flops", seq_length, g, None, cost_model,
                                               flops_model, quiet=True)
            token_slices, step = _best(
                candidates, batch_slices, fits,
                _scorer(score, cost_model, table, g, num_stages, batch_slices, schedule,
                        num_chunks, split_backward, flops_model),
                formula_scorer(table, g, num_stages, batch_slices), simulator_candidates,
                always=[e for e in equal if len(e) <= ALWAYS_SIMULATED_EQUAL])
            per_slice = (token_slices,) * len(batch_slices)
            simulated, dp_slices = step, tuple(u * g for u in sol.token_units[0])
            objective = formula_scorer(table, g, num_stages, batch_slices)(token_slices)
            if token_slices != dp_slices:
                # The simulator kept another plan: the DP's optimum of the objective, beside it.
                extra.update(dp_token_slices=list(dp_slices), dp_objective=sol.objective)
            t_max = _t_max(table, g, batch_slices, token_slices)
    else:
        batch_slices = fixed or (batch,)
        candidates = _strategy_candidates(strategy, seq_length, g, num_slices, cost_model,
                                          flops_model)
        scorer = _scorer(score, cost_model, table, g, num_stages, batch_slices, schedule,
                         num_chunks, split_backward, flops_model)
        token_slices, step = _best(candidates, batch_slices, fits, scorer,
                                   formula_scorer(table, g, num_stages, batch_slices),
                                   simulator_candidates if score == "simulator" else None)
        per_slice = (token_slices,) * len(batch_slices)
        t_max = _t_max(table, g, batch_slices, token_slices)
        objective = formula_scorer(table, g, num_stages, batch_slices)(token_slices)
        simulated = step if score == "simulator" else math.nan

    validate_token_slices(token_slices, seq_length, g, "planned token slices")
    if memory is not None:
        peak = memory.peak_bytes(schedule, batch_slices, per_slice, num_stages)
        extra["activation_memory_gib"] = round(peak / GIB, 4)
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


def _memory_budget(
    memory: ActivationMemoryModel | None,
    cap_gib: float | None,
    table: np.ndarray,
    batch_mode: str,
    batch: int,
    fixed: tuple[int, ...] | None,
    seq_length: int,
    g: int,
    num_stages: int,
    schedule: str,
    quanta: int,
) -> tuple[dp.Budget | None, dict]:
    """The memory cap as the DP's additive budget, in `quanta` steps of the headroom.

    Each slice's saved K/V copy is rounded up to whole quanta, so every plan the DP returns fits
    the cap; plans within about n/quanta of it (n slices) may be missed.
    """
    if cap_gib is None:
        return None, {}
    if memory is None:
        raise ValueError("a memory cap needs the model dims for the activation-memory model")
    if not cap_gib > 0:
        raise ValueError(f"memory cap must be > 0 GiB, got {cap_gib}")
    cap, units = cap_gib * GIB, table.shape[1] - 1
    ends = np.arange(units + 1) * g
    first = np.full((table.shape[0], units + 1), quanta + 1, dtype=np.int64)
    rest = first.copy()
    sizes = (range(1, batch + 1) if batch_mode == "free" else
             divisors(batch) if batch_mode == "uniform" else sorted(set(fixed)))
    least = _least_copies(memory, table, g, sizes)
    smallest = math.inf
    if batch_mode == "free":
        # Every batch slice in flight (an upper bound for 1F1B-style schedules).
        held = memory.held_bytes("terapipe", (batch,), seq_length, num_stages)
        best = [0.0] + [math.inf] * batch
        for a in range(1, batch + 1):
            best[a] = min(best[a - b] + least[b] for b in sizes if b <= a)
        smallest = held + best[batch]
    for b in sizes:
        if batch_mode == "free":
            copies = 1
        else:
            parts = fixed if batch_mode == "fixed" else (b,) * (batch // b)
            held = memory.held_bytes(schedule, parts, seq_length, num_stages)
            copies = memory.in_flight(schedule, parts, num_stages).count(b)
            if batch_mode == "uniform":
                smallest = min(smallest, held + copies * least[b])
        headroom = cap - held
        if headroom <= 0:
            continue
        quantum = headroom / quanta
        first[b] = np.ceil(copies * memory.copy_bytes(b, ends, 0) / quantum)
        rest[b] = np.ceil(copies * memory.copy_bytes(b, g, np.maximum(ends - g, 1)) / quantum)
    if batch_mode == "fixed":
        held = memory.held_bytes(schedule, fixed, seq_length, num_stages)
        in_flight = memory.in_flight(schedule, fixed, num_stages)
        smallest = held + sum(in_flight.count(b) * least[b] for b in sizes)
    if smallest > cap:
        raise ValueError(_no_fit(smallest, cap_gib))
    return dp.Budget(first, rest, quanta), {"memory_cap_gib": cap_gib, "_smallest": smallest}


def _least_copies(memory: ActivationMemoryModel, table: np.ndarray, g: int,
                  sizes: Any) -> dict[int, float]:
    """Per batch size, the least K/V-copy bytes of any slicing the table allows."""
    units = table.shape[1] - 1
    b, n, c = np.meshgrid(np.arange(table.shape[0]), np.arange(units + 1),
                          np.arange(units + 1), indexing="ij")
    copies = np.where(np.isfinite(table), memory.copy_bytes(b, n * g, c * g), np.inf)
    out = {}
    for size in sizes:
        prob = dp._Problem(copies, "fixed", None, (size,), None)
        out[size] = float(prob.token_dp(np.inf)[0, 0])
    return out


def _no_fit(smallest: float, cap_gib: float) -> str:
    return (
        f"no plan fits: smallest needs {smallest / GIB:.3f} GiB (cap {cap_gib:g} GiB) of "
        "activations per stage; raise the memory cap, the tensor-model-parallel size or the "
        "number of pipeline stages, or lower the batch"
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


def _best(candidates: list[tuple[int, ...]], batch_slices: tuple[int, ...], fits: Any,
          scorer: Any, prefilter: Any = None, shortlist: int | None = None,
          always: list[tuple[int, ...]] = (),
          ) -> tuple[tuple[int, ...], float]:
    """Best candidate under `scorer`; with `shortlist`, only that many, chosen by `prefilter`,
    plus the `always` candidates."""
    pool = [s for s in dict.fromkeys(candidates) if fits(batch_slices, s)]  # unique, in order
    if shortlist is not None and len(pool) > shortlist:
        pool = sorted(pool, key=prefilter)[:shortlist]
        pool += [s for s in dict.fromkeys(always) if s not in pool and fits(batch_slices, s)]
    best: tuple[float, tuple[int, ...]] | None = None
    for slices in pool:
        value = scorer(slices)
        if best is None or value < best[0]:
            best = (value, slices)
    if best is None:
        raise ValueError("no candidate slicing fits the memory cap; try strategy 'dp'")
    return best[1], best[0]


def _t_max(table: np.ndarray, g: int, batch_slices: tuple[int, ...],
           slices: tuple[int, ...]) -> float:
    worst, context = 0.0, 0
    for length in slices:
        for b in set(batch_slices):
            worst = max(worst, float(table[b, length // g, context // g]))
        context += length
    return worst


def _shorten(values: list[int], limit: int = 16) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")
