"""DP gradient reduction overlaps the backward: DDP no_sync is lifted per chunk right before that
chunk's last backward of the step, so each chunk's reduction is dispatched while that backward
runs (DP = 2 x PP = 2 x VP = 2 on gloo, megatron-core DDP with overlap_grad_reduce), and the
gradients equal those of the run without overlap."""

from __future__ import annotations

import pytest

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.grad_sync import grad_sync_events
from megatron_terapipe.testing.reference import relative_error

MODES = [(False, False), (True, False), (True, True)]


@pytest.fixture(scope="module")
def runs():
    return run_distributed(grad_sync_events, 4, MODES, timeout_s=240)


def _last_backward(events, chunk):
    begins = [i for i, e in enumerate(events) if e == ("backward-begin", chunk)]
    ends = [i for i, e in enumerate(events) if e == ("backward-end", chunk)]
    return begins[-1], ends[-1]


@pytest.mark.parametrize("mode", [1, 2], ids=["overlap", "overlap+align"])
def test_gradients_equal_the_run_without_overlap(runs, mode):
    for rank, per_rank in enumerate(runs):
        plain, overlapped = per_rank[0], per_rank[mode]
        for step, (a, b) in enumerate(zip(plain["steps"], overlapped["steps"])):
            for (place, want), (_, got) in zip(a["grads"], b["grads"]):
                err = relative_error(got, want)
                assert err <= 1e-6, (rank, step, place.name, err)


def test_each_chunk_reduces_during_its_last_backward(runs):
    """Without grad_sync_func DDP's hooks dispatch the reduction; they can only once no_sync is
    lifted, which must happen right before the chunk's last backward (hook dispatch needs the
    ready counts learnt in the first step, so step 2 shows the overlap)."""
    for rank, per_rank in enumerate(runs):
        for number, step in enumerate(per_rank[1]["steps"]):
            events = step["events"]
            for chunk in (0, 1):
                begin, end = _last_backward(events, chunk)
                exits = [i for i, e in enumerate(events) if e == ("no_sync-exit", chunk)]
                assert exits and exits[0] < begin, (rank, chunk, events)
                dispatched = [i for i, e in enumerate(events) if e == ("dispatch", chunk)]
                if number > 0:
                    assert dispatched and begin < dispatched[0] < end, (rank, chunk, events)
            # chunk 1's last backward comes before chunk 0's: its reduction overlaps chunk 0's
            assert _last_backward(events, 1)[1] < _last_backward(events, 0)[0]


def test_align_grad_reduce_launches_each_chunk_right_after_its_last_backward(runs):
    """With grad_sync_func (--align-grad-reduce) the chunk's reduction is launched explicitly
    after its last backward and before the rank's next backward, not at the end of the step."""
    for rank, per_rank in enumerate(runs):
        for step in per_rank[2]["steps"]:
            events = step["events"]
            for chunk in (0, 1):
                _, end = _last_backward(events, chunk)
                dispatched = [i for i, e in enumerate(events) if e == ("dispatch", chunk)]
                later = [i for i, e in enumerate(events) if i > end and e[0] == "backward-begin"]
                assert dispatched and end < dispatched[0], (rank, chunk, events)
                assert not later or dispatched[0] < later[0], (rank, chunk, events)
