"""The executor's per-action timeline: every action of the rank, in schedule order, on one time
axis per step (marks read once at the end of the step: `timing.StepClock`)."""

from __future__ import annotations

import time
from typing import Any

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.schedules import build_schedule
from megatron_terapipe.schedules.ir import Compute
from megatron_terapipe.testing.runner import RunCase, run_cases
from megatron_terapipe.timing import StepClock


def test_step_clock_on_cpu_counts_seconds_from_start():
    """Marks read as seconds since `start()`: at least the sleeps between them, and at most the
    wall time measured around the whole step (not absolute readings, not milliseconds)."""
    before = time.perf_counter()
    clock = StepClock()
    clock.start()
    time.sleep(0.02)
    first = clock.mark()
    time.sleep(0.03)
    second = clock.mark()
    clock.finish()
    wall = time.perf_counter() - before
    assert 0.02 <= clock.seconds(first)
    assert 0.03 <= clock.seconds(second) - clock.seconds(first)
    assert clock.seconds(second) <= wall


def timed_run_cases(rank: int, world_size: int,
                    runs: list[tuple[RunCase, dict | None]]) -> list[dict[str, Any]]:
    """`run_cases`, each result carrying the wall seconds its rank spent in the whole run (model
    build and step included), an upper bound on the span of the step's timeline."""
    start = time.perf_counter()
    results = run_cases(rank, world_size, runs)
    wall = time.perf_counter() - start
    for result in results:
        result["wall_s"] = wall
    return results


def test_timeline_records_each_action_in_schedule_order():
    """One record per action of the rank's schedule, in its order (a CommGroup's posting and a
    Wait as "comm"), each of positive length, none overlapping the next, together covering most
    of the step, all inside the wall time around the run."""
    case = RunCase(
        pipeline_parallel=2,
        num_microbatches=2,
        token_pipeline={"schedule": "token-1f1b", "num_token_slices": 3, "record_timeline": True},
    )
    per_rank = [results[0] for results in run_distributed(timed_run_cases, 2, [(case, None)])]
    schedule = build_schedule("token-1f1b", 2, 2, 3)
    for rank, result in enumerate(per_rank):
        (timeline,) = result["timelines"]
        expected = [(a.kind, a.microbatch, a.token_slice) if isinstance(a, Compute)
                    else ("comm", -1, -1) for a in schedule.stages[rank]]
        assert [(r["kind"], r["microbatch"], r["token_slice"]) for r in timeline] == expected
        computes = [r for r in timeline if r["kind"] != "comm"]
        assert [(r["kind"], r["microbatch"], r["token_slice"]) for r in computes] == [
            (c.kind, c.microbatch, c.token_slice) for c in schedule.computes(rank)]
        assert timeline[0]["start"] >= 0.0
        assert all(r["start"] < r["end"] for r in computes)
        assert all(r["start"] <= r["end"] for r in timeline)
        for before, after in zip(timeline, timeline[1:]):
            assert before["end"] <= after["start"]
        assert timeline[-1]["end"] <= result["wall_s"]
        # Between actions the loop only dispatches: the records cover most of the step (about
        # 90 % measured on a CPU), so each one times its action, not a moment next to it.
        busy = sum(r["end"] - r["start"] for r in timeline)
        assert busy >= 0.5 * timeline[-1]["end"]
