"""Per-action start/end times of megatron-core's own schedules (benchmark-only instrumentation).

Stock schedules record nothing per action, so during a benchmark step the module-level
`forward_step` and `backward_step` of `megatron.core.pipeline_parallel.schedules` are wrapped
(the schedule functions look them up as module globals at call time) and restored afterwards.
A forward's record spans the user's forward_step_func and megatron's loss bookkeeping; a
backward's record spans `backward_step`. The backward is matched to its micro-batch and chunk
through the identity of the output tensor its forward returned. Time spent in
`P2PCommunicator._communicate` (every blocking send/receive of the stock schedules) is recorded
as "comm", as the token executor records its waits; with megatron-core's overlapped P2P mode
only the posting is seen there, the wait is not.

The stock rows are the baseline of every speedup, so they are timed exactly as the token
executor times itself: a pipeline-group barrier, then `timing.StepClock` (CUDA events, a single
device synchronisation when the step ends, not one per action: that would stall the stream
between kernels on the stock side only and inflate the gain) and the same profiler range
around every action (`StepClock.range`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_terapipe.schedules.executor import ActionRecord
from megatron_terapipe.timing import StepClock


class StockRecorder:
    """Collects ActionRecords of the steps run between `start()` and `finish()` while
    `installed()` is open."""

    def __init__(self, models: Sequence[Any]) -> None:
        self.chunk_of = {id(m): i for i, m in enumerate(models)}
        self.records: list[ActionRecord] = []
        self.clock = StepClock()
        self._marks: list[tuple[str, int, int, int, object, object]] = []
        self._forward_count: dict[int, int] = {}
        self._unit_of_output: dict[int, tuple[int, int]] = {}

    def start(self, group: Any = None) -> None:
        """Begin a step's time axis after a barrier on `group` (the pipeline group), as the
        token executor begins its own: records of all ranks share one origin."""
        if group is not None:
            torch.distributed.barrier(group=group)
        self.records = []
        self._marks = []
        self._forward_count = {}
        self._unit_of_output = {}
        self.clock = StepClock()
        self.clock.start()

    def finish(self) -> None:
        """Turn the step's marks into records (the step's one device synchronisation)."""
        self.clock.finish()
        self.records = [
            ActionRecord(kind, m, t, v, self.clock.seconds(start), self.clock.seconds(end))
            for kind, m, t, v, start, end in self._marks
        ]

    @contextlib.contextmanager
    def timed(self, kind: str, microbatch: int = -1, token_slice: int = -1,
              chunk: int = -1) -> Iterator[None]:
        with self.clock.range(kind, microbatch, token_slice, chunk):
            start = self.clock.mark()
            yield
            self._marks.append((kind, microbatch, token_slice, chunk, start, self.clock.mark()))

    @contextlib.contextmanager
    def installed(self) -> Iterator[StockRecorder]:
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        original_forward = schedules.forward_step
        original_backward = schedules.backward_step
        original_communicate = P2PCommunicator._communicate
        recorder = self

        def communicate(communicator, *args, **kwargs):
            with recorder.timed("comm", -1, 0, 0):
                return original_communicate(communicator, *args, **kwargs)

        def forward_step(forward_step_func, data_iterator, model, *args, **kwargs):
            chunk = recorder.chunk_of.get(id(model), 0)
            microbatch = recorder._forward_count.get(chunk, 0)
            recorder._forward_count[chunk] = microbatch + 1
            with recorder.timed("F", microbatch, 0, chunk):
                output, num_tokens = original_forward(
                    forward_step_func, data_iterator, model, *args, **kwargs
                )
            recorder._unit_of_output[id(_first(output))] = (microbatch, chunk)
            return output, num_tokens

        def backward_step(input_tensor, output_tensor, *args, **kwargs):
            microbatch, chunk = recorder._unit_of_output.pop(id(_first(output_tensor)), (-1, 0))
            with recorder.timed("B", microbatch, 0, chunk):
                return original_backward(input_tensor, output_tensor, *args, **kwargs)

        schedules.forward_step = forward_step
        schedules.backward_step = backward_step
        P2PCommunicator._communicate = communicate
        try:
            yield self
        finally:
            schedules.forward_step = original_forward
            schedules.backward_step = original_backward
            P2PCommunicator._communicate = original_communicate


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value
