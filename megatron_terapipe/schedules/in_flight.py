"""What each rank holds, and when, read from the schedule IR's compute order.

The simulator's high-water marks and the planner's memory model both need it, and deciding it
from a schedule's name drifts from what the generators emit (a new schedule, a split backward,
interleaved chunks), so both read the same lifetimes from here. Order alone decides them,
never timing.

Two things are live on a rank:
- a unit's activations, from its forward until its backward (a split backward frees them at
  B, except what its W still needs, which lives until that W);
- a (micro-batch, chunk)'s K/V buffer, from its first forward on the rank until every one of
  its token slices has run its backward there: later slices read it, earlier slices' backwards
  take their gradient from its accumulators.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, WEIGHT_GRAD, Compute, Schedule


@dataclass(frozen=True)
class Lifetime:
    """One compute of a rank's order with what starts or ends there.

    `opens_buffer`: the first forward of its (micro-batch, chunk) on the rank.
    `closes_buffer`: the last backward of its (micro-batch, chunk).
    `first_backward`: the first backward of its (micro-batch, chunk).
    `leaves_weight_grad`: a backward whose W runs later on the rank (a split B).
    """

    compute: Compute
    opens_buffer: bool = False
    closes_buffer: bool = False
    first_backward: bool = False
    leaves_weight_grad: bool = False


def lifetimes(schedule: Schedule, rank: int,
              slice_counts: Sequence[int] | None = None) -> Iterator[Lifetime]:
    """The rank's computes in order, each with the lifetimes it opens or closes.
    `slice_counts[m]`: micro-batch m's token slices where they differ (TeraPipe's batch slices
    each cut their own way); default the schedule's count for every micro-batch."""
    computes = schedule.computes(rank)
    split = {c.unit for c in computes if c.kind == WEIGHT_GRAD}
    backwards: dict[tuple[int, int], int] = {}
    for c in computes:
        key = (c.microbatch, c.chunk)
        if c.kind == FORWARD:
            opens = key not in backwards
            backwards.setdefault(key, 0)
            yield Lifetime(c, opens_buffer=opens)
        elif c.kind == BACKWARD:
            first = backwards.get(key, 0) == 0
            backwards[key] = backwards.get(key, 0) + 1
            count = (schedule.num_token_slices if slice_counts is None
                     else slice_counts[c.microbatch])
            closes = backwards[key] == count
            if closes:
                del backwards[key]
            yield Lifetime(c, closes_buffer=closes, first_backward=first,
                           leaves_weight_grad=c.unit in split)
        else:
            yield Lifetime(c)


@dataclass(frozen=True)
class InFlight:
    """One rank's high-water marks; `units` and `buffers` peak at possibly different points."""

    units: int
    buffers: int


def in_flight(schedule: Schedule) -> list[InFlight]:
    """Per rank: the most units and K/V buffers held at once."""
    result: list[InFlight] = []
    for rank in range(schedule.num_stages):
        held = peak = live = peak_live = 0
        for event in lifetimes(schedule, rank):
            kind = event.compute.kind
            if kind == FORWARD:
                live += event.opens_buffer
                peak_live = max(peak_live, live)
                held += 1
                peak = max(peak, held)
            elif kind == BACKWARD:
                held -= 1
                live -= event.closes_buffer
        result.append(InFlight(peak, peak_live))
    return result
