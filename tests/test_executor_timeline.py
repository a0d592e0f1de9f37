"""The executor's per-action timeline: every compute of the rank, in schedule order, on one time
axis per step (marks read once at the end of the step: `timing.StepClock`)."""

from __future__ import annotations

from megatron_terapipe.schedules import build_schedule
from megatron_terapipe.testing.equivalence import run_parallel
from megatron_terapipe.testing.runner import RunCase
from megatron_terapipe.timing import StepClock


def test_step_clock_on_cpu_counts_seconds_from_start():
    clock = StepClock()
    clock.start()
    first = clock.mark()
    sum(range(10000))
    second = clock.mark()
    clock.finish()
    assert 0.0 <= clock.seconds(first) <= clock.seconds(second) < 5.0


def test_timeline_records_each_compute_in_schedule_order():
    case = RunCase(
        pipeline_parallel=2,
        num_microbatches=2,
        token_pipeline={"schedule": "token-1f1b", "num_token_slices": 3, "record_timeline": True},
    )
    (per_rank,) = run_parallel([(case, None)], 2)
    schedule = build_schedule("token-1f1b", 2, 2, 3)
    for rank, result in enumerate(per_rank):
        (timeline,) = result["timelines"]
        computes = [r for r in timeline if r["kind"] != "comm"]
        expected = [(c.kind, c.microbatch, c.token_slice) for c in schedule.computes(rank)]
        assert [(r["kind"], r["microbatch"], r["token_slice"]) for r in computes] == expected
        for before, after in zip(computes, computes[1:]):
            assert 0.0 <= before["start"] <= before["end"] <= after["start"] <= after["end"]
        assert any(r["kind"] == "comm" for r in timeline)
