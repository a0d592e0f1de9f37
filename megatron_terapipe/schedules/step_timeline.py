"""One rank's per-action timeline of a step: what `TokenPipelineForwardBackward.last_timeline`
holds when `record_timeline` is set.

Marks are taken with `timing.StepClock` (device events on CUDA, no host wait per action) and read
once, at the end of the step, so recording a timeline does not change what it measures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_terapipe.timing import StepClock


@dataclass
class ActionRecord:
    """Start/end (seconds since the step began, aligned across pipeline ranks) of one action."""

    kind: str  # "F", "B", "W" or "comm"
    microbatch: int
    token_slice: int
    chunk: int
    start: float
    end: float


class StepTimeline:
    """Times each action of a step: a profiler range always, a record only when `record`."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.clock = StepClock()
        self.marks: list[tuple[str, int, int, int, object, object]] = []
        self.records: list[ActionRecord] = []

    def start(self, pp_group: Any) -> None:
        """Begin the time axis on every pipeline rank at once (a barrier on `pp_group`)."""
        if not self.record:
            return
        torch.distributed.barrier(group=pp_group)
        self.clock.start()

    @contextlib.contextmanager
    def timed(self, kind: str, microbatch: int = -1, token_slice: int = -1,
              chunk: int = -1) -> Iterator[None]:
        # A profiler range per action whether or not the timeline is recorded, named as the
        # benchmark's stock recorder names megatron-core's actions (StepClock.range).
        with self.clock.range(kind, microbatch, token_slice, chunk):
            if not self.record:
                yield
                return
            start = self.clock.mark()
            yield
            self.marks.append((kind, microbatch, token_slice, chunk, start, self.clock.mark()))

    def finish(self) -> None:
        """Turn the step's marks into records (one device synchronisation for the whole step)."""
        if not self.record:
            return
        self.clock.finish()
        self.records = [
            ActionRecord(kind, m, t, v, self.clock.seconds(start), self.clock.seconds(end))
            for kind, m, t, v, start, end in self.marks
        ]
