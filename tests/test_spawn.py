"""The spawn harness never hangs its caller and always says which rank failed and why."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from megatron_terapipe.compat import DistributedRunError, run_distributed
from megatron_terapipe.testing.probes import (
    cpu_remaps_state,
    exit_on_rank,
    fail_on_rank,
    hang_on_rank,
    pretend_cuda_host,
)


def test_rank_exception_reaches_caller_with_its_traceback():
    """Rank 1 raises while rank 0 waits for it in a barrier: the caller gets rank 1's traceback."""
    with pytest.raises(DistributedRunError) as info:
        run_distributed(fail_on_rank, 2, 1, timeout_s=60)
    message = str(info.value)
    assert "rank 1 of 2 failed" in message
    assert "Traceback (most recent call last)" in message
    assert "in fail_on_rank" in message
    assert "ValueError: deliberate failure on rank 1" in message
    assert not mp.active_children()


def test_hanging_rank_ends_in_an_error_within_the_deadline():
    timeout_s, startup_s = 1.0, 5.0
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match="did not finish") as info:
        run_distributed(hang_on_rank, 2, 1, timeout_s=timeout_s, startup_s=startup_s)
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + startup_s + 15  # the deadline plus joining/killing
    assert "1]" in str(info.value)  # rank 1 is among the missing
    assert not mp.active_children()


def test_rank_dying_without_traceback_is_reported():
    with pytest.raises(DistributedRunError, match="rank 1 died with exit code 3"):
        run_distributed(exit_on_rank, 2, 1, 3, timeout_s=60)
    assert not mp.active_children()


def test_ranks_force_the_cpu_remaps_on_a_cuda_host():
    """The harness runs gloo/CPU ranks; on a host where CUDA is available the CPU remaps must
    still be installed (enable_cpu without force would skip them: a half-CUDA run)."""
    states = run_distributed(cpu_remaps_state, 1, timeout_s=120, rank_setup=pretend_cuda_host)
    assert states == [{"cuda_reported": True, "cpu_enabled": True, "current_device": "cpu"}]
