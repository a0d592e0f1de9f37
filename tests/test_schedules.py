"""Schedule generators: every generated schedule validates, and each has the shape it promises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_terapipe.schedules import (
    SCHEDULES,
    STOCK_SCHEDULES,
    TOKEN_SCHEDULES,
    CommGroup,
    Compute,
    P2POp,
    Wait,
    build_schedule,
    find_problems,
    validate_schedule,
)
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, SEND_PREV, WEIGHT_GRAD

INTERLEAVED = ("interleaved", "token-interleaved")


@st.composite
def shapes(draw, name: str):
    """(P, M, S, V) inside `name`'s domain, P <= 8, M <= 8, S <= 16, V <= 2."""
    P = draw(st.integers(1, 8))
    V = draw(st.integers(1, 2)) if P > 1 and name not in ("1f1b", "token-1f1b") else 1
    if name == "interleaved" or (name == "token-interleaved" and V > 1):
        M = P * draw(st.integers(1, 8 // P))
    else:
        M = draw(st.integers(1, 8))
    S = 1 if name in STOCK_SCHEDULES else draw(st.integers(1, 16))
    return P, M, S, V


def _property(name: str):
    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(shape=shapes(name))
    def check(shape):
        schedule = build_schedule(name, *shape)
        assert find_problems(schedule) == [], schedule.format()

    return check


test_terapipe_validates = _property("terapipe")
test_token_1f1b_validates = _property("token-1f1b")
test_token_interleaved_validates = _property("token-interleaved")
test_1f1b_validates = _property("1f1b")
test_interleaved_validates = _property("interleaved")
test_gpipe_validates = _property("gpipe")


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_largest_shapes_validate(name):
    P, M = 8, 8
    S = 1 if name in STOCK_SCHEDULES else 16
    V = 2 if name in INTERLEAVED or name in ("terapipe", "gpipe") else 1
    validate_schedule(build_schedule(name, P, M, S, V))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_whole_domain_validates(name):
    """Every (P, M, S, V) the property tests sample from, exhaustively (about two CPU minutes)."""
    for P in range(1, 9):
        for M in range(1, 9):
            for S in [1] if name in STOCK_SCHEDULES else range(1, 17):
                for V in (1, 2):
                    try:
                        schedule = build_schedule(name, P, M, S, V)
                    except ValueError:
                        continue
                    assert find_problems(schedule) == [], (name, P, M, S, V)


def test_registry_names():
    assert set(SCHEDULES) == {
        "terapipe",
        "token-1f1b",
        "token-interleaved",
        "1f1b",
        "interleaved",
        "gpipe",
    }
    assert set(TOKEN_SCHEDULES) | set(STOCK_SCHEDULES) == set(SCHEDULES)


def test_format_notation():
    schedule = build_schedule("1f1b", 2, 2)
    assert schedule.format() == (
        "stage 0: F0.0 [>nF0.0] F1.0 [>nF1.0] [<nB0.0] [<nB1.0] {<nB0.0} {>nF0.0} B0.0 "
        "{<nB1.0} {>nF1.0} B1.0\n"
        "stage 1: [<pF0.0] [<pF1.0] {<pF0.0} F0.0 B0.0 [>pB0.0] {<pF1.0} F1.0 B1.0 [>pB1.0] "
        "{>pB0.0 >pB1.0}"
    )
    two_chunks = build_schedule("interleaved", 2, 2, 1, 2)
    assert two_chunks.format(0).startswith("stage 0: F0.0c0 [>nF0.0c0] F1.0c0")
    assert str(two_chunks).startswith("interleaved: P=2 M=2 S=1 V=2\nstage 0:")


def test_1f1b_posts_ahead_and_waits_where_needed():
    """Sends right after their forward/backward; each receive waited right before its compute
    and posted as early as the key order allows: forward inputs one compute ahead (F4's during
    B1), a gradient right after the last send it may depend on (B0's after F2's send, which
    rank 2 needs before it can run B0)."""
    schedule = build_schedule("1f1b", 4, 6)
    assert schedule.format(1) == (
        "stage 1: [<pF0.0] [<pF1.0] {<pF0.0} F0.0 [>nF0.0] [<pF2.0] {<pF1.0} F1.0 [>nF1.0] "
        "[<pF3.0] {<pF2.0} F2.0 [>nF2.0] [<nB0.0] {<nB0.0} {>nF0.0} B0.0 [>pB0.0] {<pF3.0} F3.0 "
        "[>nF3.0] [<nB1.0] [<pF4.0] {<nB1.0} {>nF1.0} B1.0 [>pB1.0] {<pF4.0} F4.0 [>nF4.0] "
        "[<nB2.0] [<pF5.0] {<nB2.0} {>nF2.0} B2.0 [>pB2.0] {<pF5.0} F5.0 [>nF5.0] [<nB3.0] "
        "{<nB3.0} {>nF3.0} B3.0 [>pB3.0] [<nB4.0] {<nB4.0} {>nF4.0} B4.0 [>pB4.0] [<nB5.0] "
        "{<nB5.0} {>nF5.0} B5.0 [>pB5.0] {>pB0.0 >pB1.0 >pB2.0 >pB3.0 >pB4.0 >pB5.0}"
    )


def test_receives_waited_right_before_their_compute_and_sends_at_the_end():
    """A Wait inside the list is for the next compute's input, or for the send of that unit's
    forward output right before its backward; the last Wait drains the remaining sends."""
    for name in SCHEDULES:
        S = 1 if name in STOCK_SCHEDULES else 3
        V = 2 if name in INTERLEAVED else 1
        schedule = build_schedule(name, 4, 4, S, V)
        for actions in schedule.stages:
            inner = [i for i, a in enumerate(actions[:-1]) if isinstance(a, Wait)]
            drained = {op for i in inner for op in actions[i].ops if op.is_send}
            sends = [op for a in actions if isinstance(a, CommGroup) for op in a.ops if op.is_send]
            rest = tuple(op for op in sends if op not in drained)
            assert rest == () or actions[-1] == Wait(rest)
            for i in inner:
                (op,) = actions[i].ops
                consumer = next(a for a in actions[i + 1 :] if isinstance(a, Compute))
                assert all(isinstance(a, Wait) for a in actions[i + 1 : actions.index(consumer)])
                if op.is_send:
                    assert op.kind == FORWARD and consumer.kind == BACKWARD
                else:
                    assert op.kind == consumer.kind
                assert (op.microbatch, op.token_slice, op.chunk) == consumer.unit


def _leading_forwards(computes: list[Compute]) -> int:
    n = 0
    for c in computes:
        if c.kind != FORWARD:
            break
        n += 1
    return n


@pytest.mark.parametrize("P,M,S", [(4, 2, 4), (3, 3, 1), (8, 1, 3), (2, 8, 16), (5, 4, 2)])
def test_token_1f1b_warmup_and_order(P, M, S):
    schedule = build_schedule("token-1f1b", P, M, S)
    for p in range(P):
        computes = schedule.computes(p)
        warmup = min(P - p - 1 + S - 1, M * S)
        # the first steady step is one more forward, then the first backward
        assert _leading_forwards(computes) == min(warmup + 1, M * S)
        forwards = [(c.microbatch, c.token_slice) for c in computes if c.kind == FORWARD]
        backwards = [(c.microbatch, c.token_slice) for c in computes if c.kind == BACKWARD]
        assert forwards == [(m, t) for m in range(M) for t in range(S)]
        assert backwards == [(m, t) for m in range(M) for t in reversed(range(S))]


@pytest.mark.parametrize("P,M,S,V", [(4, 4, 3, 2), (3, 6, 2, 2), (2, 2, 5, 2), (4, 3, 2, 1)])
def test_token_interleaved_warmup(P, M, S, V):
    schedule = build_schedule("token-interleaved", P, M, S, V)
    total = M * S * V
    for p in range(P):
        warmup = min(2 * (P - p - 1) + (V - 1) * P * S + S - 1, total)
        assert _leading_forwards(schedule.computes(p)) == min(warmup + 1, total)


@pytest.mark.parametrize("P,M,V", [(2, 4, 2), (4, 8, 2), (3, 3, 1)])
def test_token_schedules_reduce_to_stock_with_one_slice(P, M, V):
    def orders(s):
        return [s.computes(p) for p in range(s.num_stages)]

    assert orders(build_schedule("token-interleaved", P, M, 1, V)) == orders(
        build_schedule("interleaved", P, M, 1, V)
    )
    assert orders(build_schedule("terapipe", P, M, 1, V)) == orders(
        build_schedule("gpipe", P, M, 1, V)
    )


def test_terapipe_is_gpipe_order_at_token_granularity():
    schedule = build_schedule("terapipe", 3, 2, 3)
    units = [(m, t) for m in range(2) for t in range(3)]
    for p in range(3):
        computes = schedule.computes(p)
        assert [(c.kind, c.microbatch, c.token_slice) for c in computes] == [
            ("F", m, t) for m, t in units
        ] + [("B", m, t) for m, t in reversed(units)]


def test_generators_are_pure():
    a = build_schedule("token-interleaved", 4, 4, 3, 2)
    b = build_schedule("token-interleaved", 4, 4, 3, 2)
    assert a == b and hash(a) == hash(b)


def test_every_message_is_posted_on_its_own():
    for name in SCHEDULES:
        S = 1 if name in STOCK_SCHEDULES else 3
        V = 2 if name in INTERLEAVED else 1
        schedule = build_schedule(name, 4, 4, S, V)
        for actions in schedule.stages:
            for action in actions:
                if isinstance(action, CommGroup):
                    assert len(action.ops) == 1, action


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize(
    "args,word",
    [
        ((0, 1, 1, 1), "num_stages"),
        ((2, 0, 1, 1), "num_microbatches"),
        ((2, 2, 0, 1), "num_token_slices"),
        ((2, 2, 1, 0), "num_chunks"),
        ((-1, 2, 1, 1), "num_stages"),
    ],
)
def test_values_below_one_are_rejected(name, args, word):
    with pytest.raises(ValueError, match=rf"{word} must be an integer >= 1, got -?\d"):
        build_schedule(name, *args)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError) as err:
        build_schedule("zero-bubble", 2, 2)
    assert "'zero-bubble'" in str(err.value)
    for name in SCHEDULES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", list(STOCK_SCHEDULES))
def test_stock_schedules_need_one_slice(name):
    with pytest.raises(ValueError, match="num_token_slices=1, got 4"):
        build_schedule(name, 2, 2, 4, 2 if name == "interleaved" else 1)


@pytest.mark.parametrize("name", ["1f1b", "token-1f1b"])
def test_non_interleaved_reject_chunks(name):
    with pytest.raises(ValueError, match="num_chunks=2"):
        build_schedule(name, 2, 2, 1, 2)


@pytest.mark.parametrize("name,S", [("interleaved", 1), ("token-interleaved", 3)])
def test_interleaving_needs_microbatches_divisible_by_stages(name, S):
    with pytest.raises(ValueError, match="divisible by num_stages") as err:
        build_schedule(name, 4, 6, S, 2)
    assert "num_microbatches=6" in str(err.value) and "multiples of 4" in str(err.value)


@pytest.mark.parametrize("name", ["interleaved", "token-interleaved", "terapipe", "gpipe"])
def test_chunks_need_two_ranks(name):
    S = 1 if name in STOCK_SCHEDULES else 2
    with pytest.raises(ValueError, match="needs num_stages >= 2"):
        build_schedule(name, 1, 2, S, 2)


# -- split backwards (B/W) -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["terapipe", "token-1f1b", "token-interleaved", "1f1b"])
def test_split_backward_validates_over_the_domain(name):
    for P in range(1, 6):
        for M in range(1, 6):
            for S in [1] if name in STOCK_SCHEDULES else (1, 2, 3, 5):
                for V in (1, 2):
                    try:
                        schedule = build_schedule(name, P, M, S, V, split_backward=True)
                    except ValueError:
                        continue
                    assert schedule.split_backward
                    assert find_problems(schedule) == [], (name, P, M, S, V, schedule.format())


@pytest.mark.parametrize("name, V", [("terapipe", 1), ("token-1f1b", 1), ("token-interleaved", 2)])
def test_split_backward_sends_the_gradient_before_the_weight_gradient(name, V):
    """Every backward that sends is followed by its own W, with the gradient's send posted in
    between; the first virtual stage (nothing to send) keeps whole backwards; the compute order
    is otherwise the unsplit one."""
    P, M, S = 3, 3, 3
    plain = build_schedule(name, P, M, S, V)
    split = build_schedule(name, P, M, S, V, split_backward=True)
    for rank in range(P):
        computes = split.computes(rank)
        assert [c for c in computes if c.kind != WEIGHT_GRAD] == plain.computes(rank)
        actions = split.stages[rank]
        for index, action in enumerate(actions):
            if not (isinstance(action, Compute) and action.kind == BACKWARD):
                continue
            first_virtual = rank == 0 and action.chunk == 0
            after = actions[index + 1 :]
            next_compute = next((a for a in after if isinstance(a, Compute)), None)
            if first_virtual:
                assert next_compute is None or next_compute.kind != WEIGHT_GRAD
                continue
            assert next_compute == Compute(WEIGHT_GRAD, *action.unit), split.format(rank)
            send = P2POp(SEND_PREV, BACKWARD, *action.unit)
            between = after[: after.index(next_compute)]
            assert any(isinstance(a, CommGroup) and send in a.ops for a in between)


def test_split_backward_format_and_header():
    schedule = build_schedule("terapipe", 2, 1, 2, split_backward=True)
    assert "split-backward" in str(schedule)
    assert schedule.format(1).endswith("B0.1 [>pB0.1] W0.1 B0.0 [>pB0.0] W0.0 {>pB0.1 >pB0.0}")
