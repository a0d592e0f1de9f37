"""DP gradient reduction overlaps the backward: DDP no_sync is lifted per chunk right before that
chunk's last backward of the step, so each chunk's reduction is dispatched while that backward
runs (DP = 2 x PP = 2 x VP = 2 on gloo, megatron-core DDP with overlap_grad_reduce), and the
gradients equal those of the run without overlap.

With split backwards (`--token-pipeline-split-backward`) the chunk's last backward runs under
no_sync and its reduction starts only after that backward's weight-gradient action (W), since
the weight gradients reach main_grad there; gradients again equal the run without overlap."""

from __future__ import annotations

import pytest

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.grad_sync import grad_sync_events
from megatron_terapipe.testing.reference import relative_error

# (overlap_grad_reduce, align_grad_reduce, split_backward)
MODES = [
    (False, False, False),
    (True, False, False),
    (True, True, False),
    (False, False, True),
    (True, False, True),
    (True, True, True),
]
SPLIT_PLAIN = 3


@pytest.fixture(scope="module")
def runs():
    return run_distributed(grad_sync_events, 4, MODES, timeout_s=240)


def _last_backward(events, chunk):
    begins = [i for i, e in enumerate(events) if e == ("backward-begin", chunk)]
    ends = [i for i, e in enumerate(events) if e == ("backward-end", chunk)]
    return begins[-1], ends[-1]


@pytest.mark.parametrize(
    "mode, plain_mode",
    [(1, 0), (2, 0), (4, SPLIT_PLAIN), (5, SPLIT_PLAIN)],
    ids=["overlap", "overlap+align", "split+overlap", "split+overlap+align"],
)
def test_gradients_equal_the_run_without_overlap(runs, mode, plain_mode):
    for rank, per_rank in enumerate(runs):
        plain, overlapped = per_rank[plain_mode], per_rank[mode]
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


def test_split_runs_weight_gradient_actions_and_matches_the_unsplit_run(runs):
    """The split run really ran W actions on the ranks that send gradients (every rank but the
    first virtual stage's chunk), and its fused gradients equal the unsplit, unfused run's
    within fp32 summation-order rounding."""
    for rank, per_rank in enumerate(runs):
        split = per_rank[SPLIT_PLAIN]
        assert split["split"] is True and per_rank[0]["split"] is False
        for step, (a, b) in enumerate(zip(per_rank[0]["steps"], split["steps"])):
            assert any(e[0] == "weight-grad-end" for e in b["events"]), (rank, b["events"])
            assert not any(e[0] == "weight-grad-end" for e in a["events"])
            for (place, want), (_, got) in zip(a["grads"], b["grads"]):
                err = relative_error(got, want)
                assert err <= 1e-5, (rank, step, place.name, err)


@pytest.mark.parametrize("mode", [4, 5], ids=["split+overlap", "split+overlap+align"])
def test_split_last_backward_reduces_after_its_weight_gradients(runs, mode):
    """A split last backward keeps no_sync over its B (DDP's hooks fire there, before W has added
    the weight gradients); the chunk's reductions are dispatched after its last W."""
    split_last_seen = 0
    for rank, per_rank in enumerate(runs):
        for step in per_rank[mode]["steps"]:
            events = step["events"]
            for chunk in (0, 1):
                begin, end = _last_backward(events, chunk)
                weight_grads = [i for i, e in enumerate(events) if e == ("weight-grad-end", chunk)]
                dispatched = [i for i, e in enumerate(events) if e == ("dispatch", chunk)]
                assert dispatched, (rank, chunk, events)
                if weight_grads and weight_grads[-1] > end:  # this chunk's last backward split
                    split_last_seen += 1
                    assert dispatched[0] > weight_grads[-1], (rank, chunk, events)
                    exits = [i for i, e in enumerate(events) if e == ("no_sync-exit", chunk)]
                    assert exits and exits[0] > end, (rank, chunk, events)
    # every chunk but the first virtual stage's (pipeline rank 0, chunk 0) sends gradients: two
    # pipeline-rank-0 ranks with one such chunk, two pipeline-rank-1 ranks with two; two steps
    assert split_last_seen == (2 * 1 + 2 * 2) * 2, split_last_seen
