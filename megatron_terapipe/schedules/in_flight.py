"""What each rank holds at its high-water mark, read from the schedule IR's compute order.

The simulator and the planner's memory model both need it, and deciding it from a schedule's
name drifts from what the generators emit (a new schedule, a split backward, interleaved
chunks), so both derive it here from the same walk. Order alone decides it, never timing.

Two things are live on a rank:
- a unit's activations, from its forward until its backward (a split backward frees them at
  B: its W follows right after and holds one slice's GEMM operands at most);
- a (micro-batch, chunk)'s K/V buffer, from its first forward on the rank until every one of
  its token slices has run its backward there: later slices read it, earlier slices' backwards
  take their gradient from its accumulators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, Compute, Schedule


@dataclass(frozen=True)
class InFlight:
    """One rank's high-water marks; `units` and `buffers` peak at possibly different points,
    `unit_bytes` is the peak of the weighted unit count (None without a weight)."""

    units: int
    buffers: int
    unit_bytes: float | None = None


def in_flight(
    schedule: Schedule, unit_bytes: Callable[[Compute], float] | None = None
) -> list[InFlight]:
    """Per rank: the most units and K/V buffers held at once, and optionally the most bytes
    of held units when `unit_bytes` weighs each forward."""
    result: list[InFlight] = []
    for rank in range(schedule.num_stages):
        held = peak = 0
        held_bytes = peak_bytes = 0.0
        backwards: dict[tuple[int, int], int] = {}
        live = peak_live = 0
        for c in schedule.computes(rank):
            key = (c.microbatch, c.chunk)
            size = float(unit_bytes(c)) if unit_bytes is not None else 0.0
            if c.kind == FORWARD:
                if key not in backwards:
                    backwards[key] = 0
                    live += 1
                    peak_live = max(peak_live, live)
                held += 1
                held_bytes += size
                peak = max(peak, held)
                peak_bytes = max(peak_bytes, held_bytes)
            elif c.kind == BACKWARD:
                held -= 1
                held_bytes -= size
                backwards[key] = backwards.get(key, 0) + 1
                if backwards[key] == schedule.num_token_slices:
                    live -= 1
        result.append(InFlight(peak, peak_live, peak_bytes if unit_bytes is not None else None))
    return result
