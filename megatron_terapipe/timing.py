"""Host timestamps that measure device work, not kernel launches.

CUDA kernels run asynchronously: reading the host clock right after launching work times the
launch. Every timestamp taken for a report (benchmark rounds, executor timelines, the trainer's
iteration time, the cost profiler) goes through `synchronized_clock`, which first waits for the
current device; on a CPU-only host it is `time.perf_counter`.
"""

from __future__ import annotations

import time

import torch

RANGE_PREFIX = "pipeline "


def device_synchronize() -> None:
    """Wait for all work queued on the current CUDA device (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synchronized_clock() -> float:
    """`time.perf_counter()` after the device has finished everything queued so far."""
    device_synchronize()
    return time.perf_counter()


def action_range_name(kind: str, microbatch: int = -1, token_slice: int = -1,
                      chunk: int = -1) -> str:
    """The profiler range name of one schedule action, the same for the token executor and the
    benchmark's stock recorder, so that a trace of either reads like its schedule."""
    if microbatch < 0:
        return f"{RANGE_PREFIX}{kind}"
    return f"{RANGE_PREFIX}{kind} m{microbatch} t{token_slice} v{chunk}"


class StepClock:
    """Timestamps inside one step with a single device synchronisation, at `finish()`.

    On CUDA each `mark()` records an event on the current stream (no host wait) and `finish()`
    synchronises once and converts every mark to seconds since `start()`; on the CPU marks are
    `time.perf_counter()` readings. Per-action timelines use it so that recording them does not
    add a host synchronisation per action. The token executor and the benchmark's stock recorder
    both time their actions with it and open `range()` around each, so that the two are timed
    and instrumented alike.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._origin: object = None

    def start(self) -> None:
        """Begin the step's time axis (after the device has drained earlier work)."""
        device_synchronize()
        self._origin = self.mark()

    def mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def range(kind: str, microbatch: int = -1, token_slice: int = -1,
              chunk: int = -1) -> torch.profiler.record_function:
        """A `torch.profiler` range for one action (a no-op unless a profiler is recording)."""
        return torch.profiler.record_function(
            action_range_name(kind, microbatch, token_slice, chunk))

    def finish(self) -> None:
        """Wait once for the device, so that `seconds` can read every mark."""
        device_synchronize()

    def seconds(self, mark: object) -> float:
        """Seconds from `start()` to `mark` (call after `finish()`)."""
        if self.cuda:
            return self._origin.elapsed_time(mark) / 1000.0
        return mark - self._origin
