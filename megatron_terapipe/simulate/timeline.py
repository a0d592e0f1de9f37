"""Timelines of pipeline steps, simulated or measured, and their Chrome/Perfetto trace form.

Kept free of the simulator and of torch so that the executor can record a measured `Timeline` with
the same classes and the plots can put simulated and measured steps side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

COMPUTE_KINDS = ("F", "B", "W")
EVENT_KINDS = ("F", "B", "W", "comm")
_MICROSECONDS = {"s": 1e6, "ms": 1e3, "us": 1.0}
_CATEGORY = {"F": "forward", "B": "backward", "comm": "communication"}


@dataclass(frozen=True)
class TimelineEvent:
    """One interval on one stage: a forward, a backward, or time spent in a CommGroup."""

    stage: int
    kind: str
    microbatch: int
    token_slice: int
    chunk: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def name(self) -> str:
        text = f"{self.kind}{self.microbatch}.{self.token_slice}"
        return text + (f"c{self.chunk}" if self.chunk else "")


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Covered length; measured events of one stage may overlap (async kernels, clock skew)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


@dataclass
class Timeline:
    """Events of one step on `num_stages` stages; times in `time_unit` (seconds by default)."""

    events: list[TimelineEvent]
    num_stages: int
    label: str = ""
    time_unit: str = "s"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def start_time(self) -> float:
        return min((e.start for e in self.events), default=0.0)

    @property
    def end_time(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def step_time(self) -> float:
        return self.end_time - self.start_time

    def busy_time(self) -> list[float]:
        """Compute (F/B) time per stage; communication waits count as idle."""
        return [
            _union_length(
                (e.start, e.end)
                for e in self.events
                if e.stage == stage and e.kind in COMPUTE_KINDS
            )
            for stage in range(self.num_stages)
        ]

    def time_breakdown(self) -> list[dict[str, float]]:
        """Per stage: compute (F/B), communication wait (time in comm events not overlapped by
        compute) and idle (the rest of the step's span); the three add up to the span."""
        span = self.step_time()
        out = []
        for stage, compute in enumerate(self.busy_time()):
            covered = _union_length(
                (e.start, e.end) for e in self.events if e.stage == stage and e.kind in EVENT_KINDS
            )
            out.append({"compute": compute, "comm_wait": covered - compute,
                        "idle": max(span - covered, 0.0)})
        return out

    def bubble_fraction(self) -> list[float]:
        """Per stage, the share of the whole step's span that the stage does not compute."""
        span = self.step_time()
        if span <= 0:
            return [0.0] * self.num_stages
        return [1.0 - busy / span for busy in self.busy_time()]

    def mean_bubble_fraction(self) -> float:
        fractions = self.bubble_fraction()
        return sum(fractions) / len(fractions) if fractions else 0.0

    def to_chrome_trace(self) -> dict[str, Any]:
        """Chrome trace-event JSON (loads in Perfetto and chrome://tracing): one thread per stage,
        complete ("X") events with microsecond timestamps relative to the step's start."""
        pid = 0
        scale = _MICROSECONDS.get(self.time_unit, 1e6)  # a cost-model unit shows as 1 s
        origin = self.start_time
        events: list[dict[str, Any]] = [
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"name": self.label or "pipeline"},
            }
        ]
        for stage in range(self.num_stages):
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": stage,
                    "args": {"name": f"stage {stage}"},
                }
            )
            events.append(
                {
                    "name": "thread_sort_index",
                    "ph": "M",
                    "pid": pid,
                    "tid": stage,
                    "args": {"sort_index": stage},
                }
            )
        for e in sorted(self.events, key=lambda e: (e.stage, e.start)):
            events.append(
                {
                    "name": e.name if e.kind != "comm" else "comm",
                    "cat": _CATEGORY.get(e.kind, e.kind),
                    "ph": "X",
                    "ts": (e.start - origin) * scale,
                    "dur": max(e.end - e.start, 0.0) * scale,
                    "pid": pid,
                    "tid": e.stage,
                    "args": {
                        "microbatch": e.microbatch,
                        "token_slice": e.token_slice,
                        "chunk": e.chunk,
                    },
                }
            )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"label": self.label, "time_unit": self.time_unit, **self.metadata},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "num_stages": self.num_stages,
            "time_unit": self.time_unit,
            "metadata": dict(self.metadata),
            "events": [asdict(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        return cls(
            events=[TimelineEvent(**e) for e in data["events"]],
            num_stages=int(data["num_stages"]),
            label=data.get("label", ""),
            time_unit=data.get("time_unit", "s"),
            metadata=dict(data.get("metadata", {})),
        )
