"""The validator rejects broken schedules, each for the right reason."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_terapipe.schedules import (
    CommGroup,
    Compute,
    P2POp,
    Schedule,
    ScheduleError,
    Wait,
    attach_communication,
    build_schedule,
    find_problems,
    match_messages,
    validate_schedule,
)
from megatron_terapipe.schedules.communication import recv_for, send_for
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, SEND_PREV, WEIGHT_GRAD


def F(m, t=0, v=0):
    return Compute(FORWARD, m, t, v)


def B(m, t=0, v=0):
    return Compute(BACKWARD, m, t, v)


def G(*ops):
    return CommGroup(tuple(ops))


def op(name, kind, m, t=0, v=0):
    return P2POp(name, kind, m, t, v)


def blocking(actions) -> tuple:
    """Each group waited right after it is posted: the old blocking semantics."""
    out = []
    for action in actions:
        out.append(action)
        if isinstance(action, CommGroup):
            out.append(Wait(action.ops))
    return tuple(out)


def with_stage(schedule: Schedule, rank: int, actions) -> Schedule:
    stages = list(schedule.stages)
    stages[rank] = tuple(actions)
    return dataclasses.replace(schedule, stages=tuple(stages))


def naive_comm(orders, P, V=1):
    """Each receive in its own group right before its compute, each send right after: the
    placement that exposes an order's own cyclic waits."""
    stages = []
    for rank, order in enumerate(orders):
        actions = []
        for c in order:
            recv = recv_for(c, rank, P, V)
            if recv:
                actions += [CommGroup((recv,)), Wait((recv,))]
            actions.append(c)
            send = send_for(c, rank, P, V)
            if send:
                actions += [CommGroup((send,)), Wait((send,))]
        stages.append(tuple(actions))
    return tuple(stages)


def problems_text(schedule) -> str:
    problems = find_problems(schedule)
    assert problems, "the validator accepted a broken schedule"
    return "\n".join(problems)


def test_valid_schedule_passes_and_is_returned():
    schedule = build_schedule("token-1f1b", 3, 2, 3)
    assert validate_schedule(schedule) is schedule


def test_swapped_sends_break_fifo_matching():
    """Rank 0 posts F0.1's activation before F0.0's: rank 1 receives them into the wrong slots."""
    schedule = build_schedule("terapipe", 2, 1, 2)
    broken = with_stage(
        schedule,
        0,
        blocking(
            [
                F(0, 0),
                F(0, 1),
                G(op("send_next", "F", 0, 1)),
                G(op("send_next", "F", 0, 0)),
                G(op("recv_next", "B", 0, 1)),
                B(0, 1),
                G(op("recv_next", "B", 0, 0)),
                B(0, 0),
            ]
        ),
    )
    text = problems_text(broken)
    assert "channel 0->1" in text and "different payloads" in text


def test_swapped_receives_break_fifo_matching():
    """Rank 1 posts its receives for slices 0 and 1 in the wrong order, both before use."""
    schedule = build_schedule("terapipe", 2, 1, 2)
    broken = with_stage(
        schedule,
        1,
        blocking(
            [
                G(op("recv_prev", "F", 0, 1)),
                G(op("recv_prev", "F", 0, 0)),
                F(0, 0),
                F(0, 1),
                B(0, 1),
                G(op("send_prev", "B", 0, 1)),
                B(0, 0),
                G(op("send_prev", "B", 0, 0)),
            ]
        ),
    )
    assert "different payloads" in problems_text(broken)


def test_dropped_backward():
    schedule = build_schedule("1f1b", 2, 2)
    actions = [a for a in schedule.stages[1] if a != B(1)]
    assert "B1.0c0 runs 0 times, expected 1" in problems_text(with_stage(schedule, 1, actions))


def test_duplicated_forward():
    schedule = build_schedule("gpipe", 2, 2)
    actions = list(schedule.stages[0]) + [F(0)]
    assert "F0.0c0 runs 2 times" in problems_text(with_stage(schedule, 0, actions))


def test_backward_before_its_forward():
    schedule = build_schedule("1f1b", 2, 2)
    actions = list(schedule.stages[1])
    i, j = actions.index(F(0)), actions.index(B(0))
    actions[i], actions[j] = actions[j], actions[i]
    assert "B0.0c0 runs before F0.0c0" in problems_text(with_stage(schedule, 1, actions))


def test_backwards_in_forward_slice_order():
    schedule = build_schedule("token-1f1b", 2, 1, 3)
    actions = list(schedule.stages[1])
    i, j = actions.index(B(0, 2)), actions.index(B(0, 1))
    actions[i], actions[j] = actions[j], actions[i]
    assert "reverse slice order" in problems_text(with_stage(schedule, 1, actions))


def test_forwards_out_of_slice_order():
    schedule = build_schedule("terapipe", 1, 1, 2)
    broken = with_stage(schedule, 0, [F(0, 1), F(0, 0), B(0, 1), B(0, 0)])
    assert "F0.1c0 runs before F0.0c0" in problems_text(broken)


def test_deadlocking_placement():
    """Both ranks wait to receive before they send: each blocks the other forever."""
    orders = [[F(0), F(1), B(0), B(1)], [F(0), B(0), F(1), B(1)]]
    schedule = build_schedule("1f1b", 2, 2)
    stages = (
        blocking(
            (
                F(0),
                G(op("send_next", "F", 0)),
                F(1),
                G(op("recv_next", "B", 0)),
                G(op("send_next", "F", 1)),
                B(0),
                G(op("recv_next", "B", 1)),
                B(1),
            )
        ),
        blocking(
            (
                G(op("recv_prev", "F", 0)),
                F(0),
                B(0),
                G(op("recv_prev", "F", 1)),
                G(op("send_prev", "B", 0)),
                F(1),
                B(1),
                G(op("send_prev", "B", 1)),
            )
        ),
    )
    assert [[a for a in s if isinstance(a, Compute)] for s in stages] == orders
    broken = dataclasses.replace(schedule, stages=stages)
    text = problems_text(broken)
    assert text.startswith("deadlock: ")
    assert "stage 0 blocked at action 5 {<nB0.0}" in text
    assert "stage 1 blocked at action 5 {<pF1.0}" in text
    assert "peer stage 1 has not reached action 6 [>pB0.0]" in text
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_schedule(broken)


def test_receive_posted_before_a_send_its_data_needs_deadlocks_on_one_stream():
    """Rank 0 posts the receive for B0.1's gradient before the send of F0.1's activation. Gloo
    would progress both, but on NCCL one rank's P2P calls run in order on one stream: the
    receive waits for a gradient that needs the activation queued behind it."""
    schedule = build_schedule("token-1f1b", 2, 1, 2)
    actions = list(schedule.stages[0])
    send = actions.index(G(op("send_next", "F", 0, 1)))
    recv = actions.index(G(op("recv_next", "B", 0, 1)))
    assert send < recv
    actions.insert(send, actions.pop(recv))
    text = problems_text(with_stage(schedule, 0, actions))
    assert text.startswith("deadlock: ")
    assert "behind its own unfinished group [<nB0.1]" in text


def test_wait_after_its_compute_reads_the_receive():
    schedule = build_schedule("token-1f1b", 2, 1, 2)
    actions = list(schedule.stages[1])
    wait = actions.index(Wait((op("recv_prev", "F", 0, 1),)))
    actions.insert(wait + 2, actions.pop(wait))  # after F0.1
    assert "is waited after its compute" in problems_text(with_stage(schedule, 1, actions))


def test_forward_send_waited_after_its_backward():
    schedule = build_schedule("token-1f1b", 2, 1, 2)
    actions = list(schedule.stages[0])
    wait = Wait((op("send_next", "F", 0, 1),))
    actions.remove(wait)
    actions.append(wait)
    text = problems_text(with_stage(schedule, 0, actions))
    assert ">nF0.1c0 is waited after the unit's backward" in text


def test_send_never_waited_and_wait_for_unposted_op():
    schedule = build_schedule("token-1f1b", 2, 1, 2)
    actions = list(schedule.stages[0])
    actions.remove(Wait((op("send_next", "F", 0, 0),)))
    text = problems_text(with_stage(schedule, 0, actions))
    assert ">nF0.0c0 is posted but never waited" in text
    actions = [Wait((op("recv_next", "B", 0, 1),))] + list(schedule.stages[0])
    text = problems_text(with_stage(schedule, 0, actions))
    assert "waits for <nB0.1c0, which is not posted before" in text


def _channel(rank, p2p_op, P):
    peer = (rank + (1 if p2p_op.op in ("send_next", "recv_next") else -1)) % P
    return (rank, peer) if p2p_op.is_send else (peer, rank)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from(
        [
            ("token-1f1b", 2, 2, 3, 1),
            ("terapipe", 2, 1, 4, 1),
            ("token-interleaved", 2, 2, 2, 2),
            ("interleaved", 2, 4, 1, 2),
            ("token-interleaved", 4, 4, 2, 2),
            ("1f1b", 3, 4, 1, 1),
        ]
    ),
    data=st.data(),
)
def test_swapping_two_messages_of_one_channel_is_caught(shape, data):
    """Exchange the posting positions of two messages that share a FIFO channel (at P = 2 with
    two chunks also an activation and a gradient): the validator must reject it, and the FIFO
    matching must be what finds it."""
    schedule = build_schedule(*shape)
    P = schedule.num_stages
    rank = data.draw(st.integers(0, P - 1))
    actions = list(schedule.stages[rank])
    posts = [i for i, a in enumerate(actions) if isinstance(a, CommGroup)]
    pairs = [
        (i, j)
        for n, i in enumerate(posts)
        for j in posts[n + 1 :]
        if _channel(rank, actions[i].ops[0], P) == _channel(rank, actions[j].ops[0], P)
    ]
    i, j = data.draw(st.sampled_from(pairs))
    actions[i], actions[j] = actions[j], actions[i]
    broken = with_stage(schedule, rank, actions)
    assert find_problems(broken)
    assert match_messages(broken).problems


def test_p2_shared_channel_carries_activations_and_gradients():
    """At P = 2 with two chunks, rank 1 -> rank 0 carries chunk-0 activations and gradients:
    swapping one of each mispairs them (gloo would hand a gradient to a forward)."""
    schedule = build_schedule("token-interleaved", 2, 2, 1, 2)
    actions = list(schedule.stages[0])
    recvs = [i for i, a in enumerate(actions) if isinstance(a, CommGroup) and not a.ops[0].is_send]
    kinds = {actions[i].ops[0].kind for i in recvs}
    assert kinds == {FORWARD, BACKWARD}
    forward = next(i for i in recvs if actions[i].ops[0].kind == FORWARD)
    backward = next(i for i in recvs if actions[i].ops[0].kind == BACKWARD)
    actions[forward], actions[backward] = actions[backward], actions[forward]
    problems = match_messages(with_stage(schedule, 0, actions)).problems
    assert any("cannot travel" in p or "different payloads" in p for p in problems)


def test_cyclic_compute_order_deadlocks_and_cannot_get_communication():
    """Rank 0 wants B0 (needs rank 1's B0) before F1; rank 1 wants F1 (needs rank 0's F1)
    before B0: no placement of messages can save that."""
    orders = [[F(0), B(0), F(1), B(1)], [F(0), F(1), B(0), B(1)]]
    schedule = Schedule("cyclic", 2, 2, 1, 1, naive_comm(orders, 2))
    assert "deadlock" in problems_text(schedule)
    with pytest.raises(ValueError, match="cycle"):
        attach_communication(orders, 2, 1)


def test_missing_receive():
    schedule = build_schedule("1f1b", 3, 2)
    actions = [a for a in schedule.stages[2] if a.format() != "[<pF0.0]"]
    assert "<pF0.0c0 is posted 0 times" in problems_text(with_stage(schedule, 2, actions))


def test_send_before_its_compute():
    schedule = build_schedule("gpipe", 2, 1)
    broken = with_stage(
        schedule, 0, blocking([G(op("send_next", "F", 0)), F(0), G(op("recv_next", "B", 0)), B(0)])
    )
    assert "posted before its compute" in problems_text(broken)


def test_receive_after_its_compute():
    schedule = build_schedule("gpipe", 2, 1)
    broken = with_stage(
        schedule, 1, blocking([F(0), G(op("recv_prev", "F", 0)), B(0), G(op("send_prev", "B", 0))])
    )
    assert "posted after its compute" in problems_text(broken)


def test_unneeded_message():
    schedule = build_schedule("gpipe", 2, 1)
    actions = list(schedule.stages[1]) + [G(op("send_next", "F", 0))]  # last stage sends nothing
    assert "sends nothing needed" in problems_text(with_stage(schedule, 1, actions))


def test_groups_of_other_than_one_op_are_refused():
    """Every message is posted on its own: a group merging two of a valid schedule's messages
    (one batched call) is refused by name, an empty one too, and the network model the
    simulator runs will not pair its messages."""
    schedule = build_schedule("gpipe", 2, 2)
    actions = list(schedule.stages[0])
    first, second = [i for i, a in enumerate(actions) if isinstance(a, CommGroup)][:2]
    merged = CommGroup(actions[first].ops + actions[second].ops)
    actions[first] = merged
    del actions[second]
    broken = with_stage(schedule, 0, actions)
    assert "a CommGroup posts exactly one op, this one holds 2" in problems_text(broken)
    empty = with_stage(schedule, 0, [*schedule.stages[0], CommGroup(())])
    assert "this one holds 0" in problems_text(empty)
    with pytest.raises(ValueError, match="posts exactly one op"):
        match_messages(broken)


def test_out_of_range_indices():
    schedule = build_schedule("gpipe", 2, 2)
    actions = list(schedule.stages[0]) + [F(5)]
    assert "microbatch 5 outside [0, 2)" in problems_text(with_stage(schedule, 0, actions))


def test_wrong_stage_count():
    schedule = build_schedule("gpipe", 2, 2)
    broken = dataclasses.replace(schedule, stages=schedule.stages[:1])
    assert "1 stage lists for num_stages=2" in problems_text(broken)


def test_matching_checks_virtual_stages():
    """Rank 0 chunk 1 (virtual stage 2) sends to rank 1 chunk 0 (virtual stage 1)."""
    stages = (
        (G(op("send_next", "F", 0, 0, 1)),),
        (G(op("recv_prev", "F", 0, 0, 0)),),
    )
    matching = match_messages(Schedule("x", 2, 1, 1, 2, stages))
    assert matching.problems and "virtual stage 1 needs it from 0" in matching.problems[0]


def test_unmatched_send_is_reported():
    stages = ((G(op("send_next", "F", 0)),), ())
    matching = match_messages(Schedule("x", 2, 1, 1, 1, stages))
    assert matching.problems == ["stage 0 action 0 >nF0.0c0 has no matching receive"]


def test_forward_only_mode():
    full = build_schedule("token-1f1b", 3, 2, 2)
    orders = [[c for c in full.computes(p) if c.kind == FORWARD] for p in range(3)]
    forward_only = dataclasses.replace(full, stages=attach_communication(orders, 3, 1))
    assert find_problems(forward_only, forward_only=True) == []
    assert "runs 0 times, expected 1" in "\n".join(find_problems(forward_only))
    assert "runs 1 times, expected 0" in "\n".join(find_problems(full, forward_only=True))


def test_error_lists_problems():
    schedule = build_schedule("1f1b", 2, 3)
    broken = with_stage(schedule, 1, [a for a in schedule.stages[1] if isinstance(a, CommGroup)])
    with pytest.raises(ScheduleError) as err:
        validate_schedule(broken)
    assert "schedule '1f1b' is invalid" in str(err.value)
    missing = [p for p in err.value.problems if "runs 0 times" in p]
    assert len(missing) == 6  # three forwards and three backwards


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(["terapipe", "token-1f1b", "token-interleaved"]),
    P=st.integers(2, 4),
    S=st.integers(1, 3),
    data=st.data(),
)
def test_dropping_any_action_is_caught(name, P, S, data):
    V = 2 if name == "token-interleaved" else 1
    schedule = build_schedule(name, P, P, S, V)
    rank = data.draw(st.integers(0, P - 1))
    actions = list(schedule.stages[rank])
    index = data.draw(st.integers(0, len(actions) - 1))
    del actions[index]
    assert find_problems(with_stage(schedule, rank, actions))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(["1f1b", "token-1f1b", "terapipe"]), data=st.data())
def test_moving_a_backward_before_its_forward_is_caught(name, data):
    S = 1 if name == "1f1b" else 2
    schedule = build_schedule(name, 3, 3, S)
    rank = data.draw(st.integers(0, 2))
    actions = list(schedule.stages[rank])
    backward = data.draw(
        st.sampled_from([a for a in actions if a in schedule.computes(rank) and a.kind == BACKWARD])
    )
    actions.remove(backward)
    forward = actions.index(F(backward.microbatch, backward.token_slice))
    actions.insert(forward, backward)
    assert "runs before" in problems_text(with_stage(schedule, rank, actions))


# -- split backwards (W actions) ----------------------------------------------------------------


def W(m, t=0, v=0):
    return Compute(WEIGHT_GRAD, m, t, v)


def _split_terapipe():
    return build_schedule("terapipe", 2, 1, 3, split_backward=True)


def _with_stage(schedule, rank, actions):
    stages = list(schedule.stages)
    stages[rank] = tuple(actions)
    return dataclasses.replace(schedule, stages=tuple(stages))


def test_split_schedule_is_valid():
    assert find_problems(_split_terapipe()) == []


def test_weight_gradient_before_its_backward():
    s = _split_terapipe()
    actions = list(s.stages[1])
    w = actions.index(W(0, 2))
    actions.insert(actions.index(B(0, 2)), actions.pop(w))
    problems = find_problems(_with_stage(s, 1, actions))
    assert any("W0.2c0 runs before its backward" in p for p in problems), problems


def test_weight_gradient_twice():
    s = _split_terapipe()
    actions = list(s.stages[1])
    actions.insert(actions.index(W(0, 1)), W(0, 2))
    problems = find_problems(_with_stage(s, 1, actions))
    assert any("W0.2c0 runs more than once" in p for p in problems), problems


def test_weight_gradient_after_the_gradient_sync_point():
    """W0.2 moved after W0.0 (the W of the chunk's last backward, where the sync starts)."""
    s = _split_terapipe()
    actions = list(s.stages[1])
    actions.pop(actions.index(W(0, 2)))
    actions.insert(actions.index(W(0, 0)) + 1, W(0, 2))
    problems = find_problems(_with_stage(s, 1, actions))
    assert any("W0.2c0 runs after chunk 0's gradient sync point" in p for p in problems), problems


def test_weight_gradient_in_forward_only_schedule():
    s = build_schedule("terapipe", 1, 1, 2)
    forward_only = _with_stage(s, 0, [a for a in s.stages[0] if a.kind == FORWARD] + [W(0, 0)])
    problems = find_problems(forward_only, forward_only=True)
    assert any("forward-only" in p for p in problems), problems


def test_weight_gradient_is_not_a_message_kind():
    s = _split_terapipe()
    bad = P2POp(SEND_PREV, WEIGHT_GRAD, 0, 0, 0)
    problems = find_problems(_with_stage(s, 1, [*s.stages[1], CommGroup((bad,))]))
    assert any("kind 'W' is not one of" in p for p in problems), problems


def test_weight_gradients_out_of_backward_order():
    """W0.1 swapped ahead of W0.2: still exact in value, but main_grad would accumulate in a
    different order than the unsplit backward (no longer bitwise)."""
    s = build_schedule("terapipe", 2, 1, 4, split_backward=True)
    actions = list(s.stages[1])
    w2 = actions.pop(actions.index(W(0, 2)))
    actions.insert(actions.index(W(0, 1)) + 1, w2)
    problems = find_problems(_with_stage(s, 1, actions))
    assert any("W0.1c0 adds to main_grad before W0.2c0" in p for p in problems), problems


def test_unsplit_backward_between_a_split_backward_and_its_w():
    """B0.1 left whole but run before W0.2 (whose B ran earlier): B0.1's weight gradients would
    reach main_grad first."""
    s = build_schedule("terapipe", 2, 1, 3, split_backward=True)
    actions = [a for a in s.stages[1] if a != W(0, 1)]
    w2 = actions.pop(actions.index(W(0, 2)))
    actions.insert(actions.index(B(0, 1)) + 1, w2)
    problems = find_problems(_with_stage(s, 1, actions))
    assert any("B0.1c0 adds to main_grad before W0.2c0" in p for p in problems), problems
