"""Event simulation of a schedule on per-action costs.

It runs the validator's network model (`schedules.network`: FIFO channels, non-blocking posts,
one serial P2P stream per rank, Waits where data is read) with real costs instead of zeros, so a
simulated step waits exactly where the executor would. Time spent in a Wait is the timeline's
"comm".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_terapipe.schedules.in_flight import in_flight
from megatron_terapipe.schedules.ir import (
    FORWARD,
    WEIGHT_GRAD,
    Compute,
    P2POp,
    Schedule,
    Wait,
)
from megatron_terapipe.schedules.network import describe_deadlock, match_messages, run_network
from megatron_terapipe.schedules.validator import ScheduleError
from megatron_terapipe.simulate.costs import ActionCosts
from megatron_terapipe.simulate.timeline import Timeline, TimelineEvent

P2P_MODES = ("rendezvous", "eager")


@dataclass
class SimulationResult:
    """Step time, idle share and activation high-water marks of one simulated step."""

    schedule: str
    num_stages: int
    num_microbatches: int
    num_chunks: int
    token_slices: tuple[int, ...]
    cost_model: str
    p2p: str
    step_time: float
    busy_time: list[float]
    bubble_fraction: list[float]
    peak_activations: list[int]
    peak_activation_bytes: list[float] | None
    timeline: Timeline
    split_backward: bool = False

    @property
    def mean_bubble_fraction(self) -> float:
        return sum(self.bubble_fraction) / len(self.bubble_fraction)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the timeline is left out: use `timeline.to_dict()`)."""
        return {
            "schedule": self.schedule,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "num_token_slices": len(self.token_slices),
            "num_chunks": self.num_chunks,
            "token_slices": list(self.token_slices),
            "cost_model": self.cost_model,
            "p2p": self.p2p,
            "split_backward": self.split_backward,
            "time_unit": self.timeline.time_unit,
            "step_time": self.step_time,
            "busy_time": list(self.busy_time),
            "bubble_fraction": list(self.bubble_fraction),
            "mean_bubble_fraction": self.mean_bubble_fraction,
            "peak_activations": list(self.peak_activations),
            "peak_activation_bytes": None
            if self.peak_activation_bytes is None
            else list(self.peak_activation_bytes),
        }


def _check_slices(schedule: Schedule, token_slices: Sequence[int]) -> tuple[int, ...]:
    slices = tuple(int(x) for x in token_slices)
    if len(slices) != schedule.num_token_slices:
        raise ValueError(
            f"{len(slices)} token slice lengths {list(slices)} for a schedule built with "
            f"num_token_slices={schedule.num_token_slices}"
        )
    if any(length < 1 for length in slices):
        raise ValueError(f"token slices {list(slices)}: every slice must be >= 1 token")
    return slices


def simulate(
    schedule: Schedule,
    token_slices: Sequence[int],
    costs: ActionCosts,
    p2p: str = "rendezvous",
) -> SimulationResult:
    """Simulate one step of `schedule` with slices of the given lengths.

    `p2p="rendezvous"` is the executor's blocking contract (and the validator's); `"eager"`
    lets sends finish without waiting for their receive, an optimistic bound.
    Raises ScheduleError if the schedule deadlocks or its messages do not pair up; the other
    rules (each unit once, dependency order) are `validate_schedule`'s job, left out here
    because planners simulate one schedule many times.
    """
    if p2p not in P2P_MODES:
        raise ValueError(f"unknown p2p mode {p2p!r}; valid choices: {', '.join(P2P_MODES)}")
    slices = _check_slices(schedule, token_slices)
    context = [sum(slices[:t]) for t in range(len(slices))]

    split = [
        {c.unit for c in schedule.computes(rank) if c.kind == WEIGHT_GRAD}
        for rank in range(schedule.num_stages)
    ]

    def compute_time(rank: int, c: Compute) -> float:
        shape = (rank, c.chunk, slices[c.token_slice], context[c.token_slice])
        if c.kind == FORWARD:
            return float(costs.forward(*shape))
        if c.kind == WEIGHT_GRAD:
            return costs.weight_grad_time(*shape)
        whole = float(costs.backward(*shape))
        if c.unit not in split[rank]:
            return whole
        weight_grad = costs.weight_grad_time(*shape)
        if weight_grad > whole:
            raise ValueError(
                f"cost model {costs.name!r}: the weight gradient of {c.format()} on stage {rank} "
                f"({weight_grad:g}) exceeds its whole backward ({whole:g})"
            )
        return whole - weight_grad

    def transfer_time(op: P2POp) -> float:
        return float(costs.transfer(slices[op.token_slice]))

    matching = match_messages(schedule)
    if matching.problems:
        raise ScheduleError(schedule.name, matching.problems)
    run = run_network(schedule, matching, compute_time, transfer_time, eager_sends=(p2p == "eager"))
    if run.deadlocked:
        raise ScheduleError(
            schedule.name, ["deadlock: " + describe_deadlock(schedule, matching, run)]
        )

    events = []
    for rank, actions in enumerate(schedule.stages):
        for index, action in enumerate(actions):
            start, end = run.start[rank][index], run.end[rank][index]
            if isinstance(action, Compute):
                events.append(TimelineEvent(rank, action.kind, *action.unit, start=start, end=end))
            elif isinstance(action, Wait) and end > start:
                ops = action.ops
                shown = next((op for op in ops if not op.is_send), ops[0])
                events.append(
                    TimelineEvent(
                        rank,
                        "comm",
                        shown.microbatch,
                        shown.token_slice,
                        shown.chunk,
                        start=start,
                        end=end,
                    )
                )
    timeline = Timeline(
        events=events,
        num_stages=schedule.num_stages,
        label=_label(schedule, slices, costs),
        time_unit=costs.time_unit,
        metadata={"schedule": schedule.name, "cost_model": costs.name, "p2p": p2p,
                  "split_backward": schedule.split_backward},
    )
    step = timeline.end_time
    busy = [0.0] * schedule.num_stages
    for e in events:
        if e.kind != "comm":
            busy[e.stage] += e.end - e.start
    counts, nbytes = _peak_activations(schedule, slices, context, costs)
    return SimulationResult(
        schedule=schedule.name,
        num_stages=schedule.num_stages,
        num_microbatches=schedule.num_microbatches,
        num_chunks=schedule.num_chunks,
        token_slices=slices,
        cost_model=costs.name,
        p2p=p2p,
        step_time=step,
        busy_time=busy,
        bubble_fraction=[1.0 - b / step if step > 0 else 0.0 for b in busy],
        peak_activations=counts,
        peak_activation_bytes=nbytes,
        timeline=timeline,
        split_backward=schedule.split_backward,
    )


def _peak_activations(
    schedule: Schedule, slices: tuple[int, ...], context: list[int], costs: ActionCosts
) -> tuple[list[int], list[float] | None]:
    """High-water marks over each rank's order (`schedules.in_flight`, which the memory model
    reads too), and the memory model's peak bytes per rank when the costs carry one."""
    counts = [m.units for m in in_flight(schedule)]
    if costs.memory is None:
        return counts, None
    micro = schedule.num_microbatches
    nbytes = costs.memory.rank_peaks(schedule, [slices] * micro, [costs.batch] * micro)
    return counts, [float(b) for b in nbytes]


def _label(schedule: Schedule, slices: tuple[int, ...], costs: ActionCosts) -> str:
    parts = [
        f"{schedule.name}",
        f"P={schedule.num_stages}",
        f"M={schedule.num_microbatches}",
        f"S={len(slices)}",
    ]
    if schedule.num_chunks > 1:
        parts.append(f"V={schedule.num_chunks}")
    if schedule.split_backward:
        parts.append("split B/W")
    return " ".join(parts) + f" ({costs.name})"
