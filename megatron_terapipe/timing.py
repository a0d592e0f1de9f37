"""Host timestamps that measure device work, not kernel launches.

CUDA kernels run asynchronously: reading the host clock right after launching work times the
launch. Every timestamp taken for a report (benchmark rounds, executor timelines, the trainer's
iteration time, the cost profiler) goes through `synchronized_clock`, which first waits for the
current device; on a CPU-only host it is `time.perf_counter`.
"""

from __future__ import annotations

import time

import torch


def device_synchronize() -> None:
    """Wait for all work queued on the current CUDA device (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synchronized_clock() -> float:
    """`time.perf_counter()` after the device has finished everything queued so far."""
    device_synchronize()
    return time.perf_counter()
