"""`enable_cpu()` makes megatron-core's CUDA-only set-up work on CPU, once, and only when asked.

The checks run in spawned ranks (2, with TP=2) because the remaps are process-wide: the pytest
process itself stays unpatched for every other test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.probes import rng_probe


@pytest.fixture(scope="module")
def probe():
    return run_distributed(rng_probe, 2, 1234, timeout_s=120)


def test_enable_cpu_is_idempotent(probe):
    for rank in probe:
        assert rank["enable_again"] is True
        assert rank["enabled"] is True
        assert rank["idempotent"], "a second enable_cpu() installed patches again"
        assert rank["current_device"] == "cpu"
        assert rank["tracker_class"] == "CpuRNGStatesTracker"


def test_importing_compat_patches_nothing():
    """Only enable_cpu() changes anything; checked in a fresh interpreter, since other tests
    may legitimately have called enable_cpu() in this one."""
    code = (
        "import torch; original = torch.cuda.current_device\n"
        "import megatron_terapipe.compat as compat\n"
        "from megatron_terapipe.compat.cpu import applied_patches\n"
        "assert not compat.cpu_enabled() and applied_patches() == []\n"
        "assert torch.cuda.current_device is original\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_parallel_seed_streams_are_reproducible(probe):
    """Seeding twice resets the tracker and gives the very same streams."""
    for rank in probe:
        first, second = rank["streams"]
        assert first == second


def test_tracker_fork_streams_are_distinct_and_isolated(probe):
    for rank in probe:
        streams = rank["streams"][0]
        # A fork draws from its own stream and leaves the default one untouched ...
        assert streams["default"] == rank["default_without_fork"]
        assert streams["model_parallel"] != streams["default"][:4]
        # ... and a second fork continues that stream rather than restarting it.
        assert streams["model_parallel_next"] != streams["model_parallel"]


def test_model_parallel_stream_differs_across_tp_ranks(probe):
    """TP ranks need distinct dropout masks for sharded activations, equal ones elsewhere."""
    a, b = (rank["streams"][0] for rank in probe)
    assert a["model_parallel"] != b["model_parallel"]
    assert a["data_parallel"] == b["data_parallel"]
    assert a["default"] == b["default"]
