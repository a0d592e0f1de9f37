"""Per-action start/end times of megatron-core's own schedules (benchmark-only instrumentation).

Stock schedules record nothing per action, so during a benchmark step the module-level
`forward_step` and `backward_step` of `megatron.core.pipeline_parallel.schedules` are wrapped
(the schedule functions look them up as module globals at call time) and restored afterwards.
A forward's record spans the user's forward_step_func and megatron's loss bookkeeping; a
backward's record spans `backward_step`. Times are seconds since `t0`, which the harness takes
right after a pipeline-group barrier, as the token executor does, so records align across ranks.
The backward is matched to its micro-batch and chunk through the identity of the output tensor
its forward returned. Time spent in `P2PCommunicator._communicate` (every blocking send/receive
of the stock schedules) is recorded as "comm", as the token executor records its waits; with
megatron-core's overlapped P2P mode only the posting is seen there, the wait is not.
Timestamps come from `synchronized_clock` (device work, not kernel launches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_terapipe.schedules.executor import ActionRecord
from megatron_terapipe.timing import synchronized_clock


class StockRecorder:
    """Collects ActionRecords while `installed()` is open."""

    def __init__(self, models: Sequence[Any]) -> None:
        self.chunk_of = {id(m): i for i, m in enumerate(models)}
        self.records: list[ActionRecord] = []
        self.t0 = 0.0
        self._forward_count: dict[int, int] = {}
        self._unit_of_output: dict[int, tuple[int, int]] = {}

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.records = []
        self._forward_count = {}
        self._unit_of_output = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StockRecorder]:
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        original_forward = schedules.forward_step
        original_backward = schedules.backward_step
        original_communicate = P2PCommunicator._communicate
        recorder = self

        def communicate(communicator, *args, **kwargs):
            start = synchronized_clock() - recorder.t0
            result = original_communicate(communicator, *args, **kwargs)
            end = synchronized_clock() - recorder.t0
            recorder.records.append(ActionRecord("comm", -1, 0, 0, start, end))
            return result

        def forward_step(forward_step_func, data_iterator, model, *args, **kwargs):
            chunk = recorder.chunk_of.get(id(model), 0)
            microbatch = recorder._forward_count.get(chunk, 0)
            recorder._forward_count[chunk] = microbatch + 1
            start = synchronized_clock() - recorder.t0
            output, num_tokens = original_forward(
                forward_step_func, data_iterator, model, *args, **kwargs
            )
            end = synchronized_clock() - recorder.t0
            recorder.records.append(ActionRecord("F", microbatch, 0, chunk, start, end))
            recorder._unit_of_output[id(_first(output))] = (microbatch, chunk)
            return output, num_tokens

        def backward_step(input_tensor, output_tensor, *args, **kwargs):
            microbatch, chunk = recorder._unit_of_output.pop(id(_first(output_tensor)), (-1, 0))
            start = synchronized_clock() - recorder.t0
            grad = original_backward(input_tensor, output_tensor, *args, **kwargs)
            end = synchronized_clock() - recorder.t0
            recorder.records.append(ActionRecord("B", microbatch, 0, chunk, start, end))
            return grad

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
