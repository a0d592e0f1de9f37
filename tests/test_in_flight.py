"""The shared in-flight derivation against counts worked out by hand from each schedule's
order, and against a brute-force replay of the IR."""

from __future__ import annotations

import pytest

from megatron_terapipe.schedules.generators import terapipe, token_1f1b, token_interleaved
from megatron_terapipe.schedules.in_flight import in_flight, lifetimes
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, WEIGHT_GRAD


def _replay(schedule, rank):
    """Live sets after every action, recomputed from scratch (no running counters)."""
    order = schedule.computes(rank)
    units = buffers = 0
    for i in range(len(order)):
        done = order[: i + 1]
        fw = {c.unit for c in done if c.kind == FORWARD}
        bw = {c.unit for c in done if c.kind == BACKWARD}
        units = max(units, len(fw - bw))
        keys = {(m, v) for m, _, v in fw}
        full = {(m, v) for m, v in keys
                if all((m, t, v) in bw for t in range(schedule.num_token_slices))}
        buffers = max(buffers, len(keys - full))
    return units, buffers


@pytest.mark.parametrize("make,P,M,S", [
    (terapipe, 2, 4, 8), (token_1f1b, 2, 4, 8), (token_1f1b, 3, 1, 4),
    (token_interleaved, 2, 4, 4), (terapipe, 2, 1, 16),
])
def test_in_flight_matches_replay(make, P, M, S):
    schedule = make(P, M, S)
    marks = in_flight(schedule)
    for rank in range(P):
        assert (marks[rank].units, marks[rank].buffers) == _replay(schedule, rank)


def test_terapipe_holds_every_slice_and_every_buffer():
    # All forwards run before any backward: rank 0 holds M·S units and M buffers at once.
    marks = in_flight(terapipe(2, 4, 8))
    assert (marks[0].units, marks[0].buffers) == (32, 4)


def _replay_lifetimes(schedule, rank):
    """Each compute's flags recomputed from the prefix of the order (no running counters)."""
    order = schedule.computes(rank)
    flags = []
    for i, c in enumerate(order):
        before = order[:i]
        key = (c.microbatch, c.chunk)
        same = [d for d in before if (d.microbatch, d.chunk) == key]
        backwards = sum(d.kind == BACKWARD for d in same) + (c.kind == BACKWARD)
        flags.append((
            c.kind == FORWARD and not any(d.kind == FORWARD for d in same),
            c.kind == BACKWARD and backwards == schedule.num_token_slices,
            c.kind == BACKWARD and backwards == 1,
            c.kind == BACKWARD and any(d.kind == WEIGHT_GRAD and d.unit == c.unit
                                       for d in order[i + 1:]),
        ))
    return flags


@pytest.mark.parametrize("make,P,M,S,split", [
    (terapipe, 2, 2, 4, False), (token_1f1b, 3, 4, 4, True), (token_interleaved, 2, 4, 4, True),
])
def test_lifetimes_match_replay(make, P, M, S, split):
    from megatron_terapipe.schedules.generators import build_schedule

    schedule = build_schedule(make(P, M, S).name, P, M, S, split_backward=split)
    for rank in range(P):
        got = [(e.opens_buffer, e.closes_buffer, e.first_backward, e.leaves_weight_grad)
               for e in lifetimes(schedule, rank)]
        assert got == _replay_lifetimes(schedule, rank)
    if split:
        assert any(e.leaves_weight_grad for r in range(P) for e in lifetimes(schedule, r))


def test_lifetimes_close_each_micro_batch_on_its_own_slice_count():
    """TeraPipe's batch slices cut their own way: micro-batch 1 has one slice where 0 has
    three, so its buffer closes at its first backward (with the schedule's count it never
    would)."""
    from megatron_terapipe.schedules.generators import schedule_from_orders
    from megatron_terapipe.schedules.ir import Compute

    order = [Compute(FORWARD, 0, 0), Compute(FORWARD, 0, 1), Compute(FORWARD, 0, 2),
             Compute(FORWARD, 1, 0), Compute(BACKWARD, 1, 0), Compute(BACKWARD, 0, 2),
             Compute(BACKWARD, 0, 1), Compute(BACKWARD, 0, 0)]
    schedule = schedule_from_orders("terapipe", 1, 2, 3, 1, [order])
    closes = [e.compute.format() for e in lifetimes(schedule, 0, [3, 1]) if e.closes_buffer]
    assert closes == ["B1.0", "B0.0"]
    assert [e.compute.format() for e in lifetimes(schedule, 0) if e.closes_buffer] == ["B0.0"]
