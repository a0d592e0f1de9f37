"""The shared in-flight derivation against counts worked out by hand from each schedule's
order, and against a brute-force replay of the IR."""

from __future__ import annotations

import pytest

from megatron_terapipe.schedules.generators import terapipe, token_1f1b, token_interleaved
from megatron_terapipe.schedules.in_flight import in_flight
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD


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


def test_weighted_units_peak():
    schedule = terapipe(2, 2, 4)
    marks = in_flight(schedule, lambda c: 1.0 + c.token_slice)
    # Every unit is held at rank 0's peak: 2 micro-batches × (1 + 2 + 3 + 4).
    assert marks[0].unit_bytes == 20.0
