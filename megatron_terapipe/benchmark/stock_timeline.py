"""Per-action start/end times of megatron-core's own schedules (benchmark-only instrumentation).

Stock schedules record nothing per action, so during a benchmark step the module-level
`forward_step` and `backward_step` of `megatron.core.pipeline_parallel.schedules` are wrapped
(the schedule functions look them up as module globals at call time) and restored afterwards.
A forward's record spans the user's forward_step_func and megatron's loss bookkeeping; a
backward's record spans `backward_step`. Times are seconds since `t0`, which the harness takes
right after a pipeline-group barrier, as the token executor does, so records align across ranks.
The backward is matched to its micro-batch and chunk through the identity of the output tensor
its forward returned.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_terapipe.schedules.executor import ActionRecord


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

        original_forward = schedules.forward_step
        original_backward = schedules.backward_step
        recorder = self

        def forward_step(forward_step_func, data_iterator, model, *args, **kwargs):
            chunk = recorder.chunk_of.get(id(model), 0)
            microbatch = recorder._forward_count.get(chunk, 0)
            recorder._forward_count[chunk] = microbatch + 1
            start = time.perf_counter() - recorder.t0
            output, num_tokens = original_forward(
                forward_step_func, data_iterator, model, *args, **kwargs
            )
            end = time.perf_counter() - recorder.t0
            recorder.records.append(ActionRecord("F", microbatch, 0, chunk, start, end))
            recorder._unit_of_output[id(_first(output))] = (microbatch, chunk)
            return output, num_tokens

        def backward_step(input_tensor, output_tensor, *args, **kwargs):
            microbatch, chunk = recorder._unit_of_output.pop(id(_first(output_tensor)), (-1, 0))
            start = time.perf_counter() - recorder.t0
            grad = original_backward(input_tensor, output_tensor, *args, **kwargs)
            end = time.perf_counter() - recorder.t0
            recorder.records.append(ActionRecord("B", microbatch, 0, chunk, start, end))
            return grad

        schedules.forward_step = forward_step
        schedules.backward_step = backward_step
        try:
            yield self
        finally:
            schedules.forward_step = original_forward
            schedules.backward_step = original_backward


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value
