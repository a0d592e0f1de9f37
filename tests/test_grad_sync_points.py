"""A chunk's gradient sync point is derived once (`grad_sync.grad_sync_points`) and both the
validator and the executor's DDP policy (`GradSync`) act on it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from megatron_terapipe.schedules import build_schedule, find_problems
from megatron_terapipe.schedules.grad_sync import GradSync, grad_sync_points
from megatron_terapipe.schedules.ir import BACKWARD, WEIGHT_GRAD, Compute


@pytest.mark.parametrize("split", [False, True])
def test_sync_point_is_the_last_backward_or_its_weight_gradient(split):
    schedule = build_schedule("token-interleaved", 2, 2, 2, 2, split_backward=split)
    for rank, actions in enumerate(schedule.stages):
        points = grad_sync_points(actions)
        assert sorted(points) == [0, 1]
        for chunk, point in points.items():
            backwards = [i for i, a in enumerate(actions) if isinstance(a, Compute)
                         and a.kind == BACKWARD and a.chunk == chunk]
            assert point.last_backward == backwards[-1]
            unit = actions[point.last_backward].unit
            weight_grads = [i for i, a in enumerate(actions) if isinstance(a, Compute)
                            and a.kind == WEIGHT_GRAD and a.unit == unit]
            assert point.complete == (weight_grads[0] if weight_grads else point.last_backward)
            # the first virtual stage sends no gradient, so its backwards are never split
            assert point.split == (split and (rank, chunk) != (0, 0))


class _Chunk:
    """A DDP chunk that records when no_sync is left and when a reduction is launched."""

    def __init__(self, chunk: int, events: list) -> None:
        self.chunk, self.events = chunk, events
        self.ddp_config = SimpleNamespace(overlap_grad_reduce=True)

    @contextlib.contextmanager
    def no_sync(self):
        yield
        self.events.append(("no_sync-exit", self.chunk))

    def start_grad_sync(self, *args):
        self.events.append(("start", self.chunk))

    def parameters(self):
        return iter(())


def _policy_events(split: bool, explicit: bool) -> tuple[list, dict]:
    """Walk rank 1's list as the step loop does, recording what the policy does at each index."""
    actions = build_schedule("token-interleaved", 2, 2, 2, 2, split_backward=split).stages[1]
    events: list = []
    chunks = [_Chunk(0, events), _Chunk(1, events)]
    config = SimpleNamespace(
        no_sync_func=[c.no_sync for c in chunks],
        grad_sync_func=[c.start_grad_sync for c in chunks] if explicit else None,
    )
    points = grad_sync_points(actions)
    policy = GradSync(config, chunks, points, enabled=True)
    for index, action in enumerate(actions):
        if isinstance(action, Compute):
            policy.before(index)
            events.append(("ran", index))
            policy.after(index)
    policy.finish()
    return events, points


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_the_policy_acts_at_the_derived_points(split, explicit):
    events, points = _policy_events(split, explicit)
    for chunk, point in points.items():
        exit_at = events.index(("no_sync-exit", chunk))
        if split or explicit:
            # no_sync held over the last backward (and its W); the reduction launched right
            # after the action that completes the gradients
            assert events[exit_at - 1] == ("ran", point.complete)
            assert events[exit_at + 1] == ("start", chunk)
        else:
            # DDP's hooks reduce during the last backward itself
            assert events[exit_at + 1] == ("ran", point.last_backward)
            assert ("start", chunk) not in events


def test_the_validator_reads_the_same_point():
    """Moving the W of a chunk's last backward later moves its sync point with it, so only a
    W past that new point is refused."""
    schedule = build_schedule("terapipe", 2, 1, 3, split_backward=True)
    actions = list(schedule.stages[1])
    point = grad_sync_points(actions)[0]
    assert point.split and not find_problems(schedule)
    w_last = actions.pop(point.complete)
    actions.append(w_last)  # still the chunk's sync point, now the list's last action
    assert grad_sync_points(actions)[0].complete == len(actions) - 1
    assert not any("sync point" in p for p in find_problems(
        type(schedule)(**{**schedule.__dict__, "stages": (schedule.stages[0], tuple(actions))})))
