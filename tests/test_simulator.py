"""The simulator reproduces the textbook bubbles, prices slices by the cost model, and counts
activations held."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_terapipe.schedules import (
    CommGroup,
    Compute,
    P2POp,
    Schedule,
    ScheduleError,
    Wait,
    build_schedule,
)
from megatron_terapipe.simulate import ActionCosts, simulate

UNIFORM = ActionCosts.uniform()


def bubbles(name, P, M, S=1, V=1, p2p="rendezvous"):
    result = simulate(build_schedule(name, P, M, S, V), [7] * S, UNIFORM, p2p=p2p)
    return result


def assert_all(values, expected):
    assert values == pytest.approx([expected] * len(values), abs=1e-12)


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize("P", range(1, 9))
def test_1f1b_and_gpipe_bubble(name, P):
    for M in range(1, 9):
        result = bubbles(name, P, M)
        expected = (P - 1) / (M + P - 1)
        assert_all(result.bubble_fraction, expected)
        assert result.mean_bubble_fraction == pytest.approx(expected)
        assert result.step_time == 3 * (M + P - 1)


@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("P", range(3, 9))
def test_interleaved_bubble(P, V):
    for M in range(P, 9, P):
        assert_all(bubbles("interleaved", P, M, 1, V).bubble_fraction, (P - 1) / (V * M + P - 1))


def test_interleaved_bubble_on_two_stages():
    """With P = 2 one activation must cross while both ranks are mid-compute (for M >= 4). With
    blocking groups a rank stalled there; sends that complete while the rank computes and
    receives posted ahead keep the textbook bubble under rendezvous too."""
    for M in (2, 4, 6, 8):
        expected = 1 / (2 * M + 1)
        assert_all(bubbles("interleaved", 2, M, 1, 2, p2p="eager").bubble_fraction, expected)
        assert_all(bubbles("interleaved", 2, M, 1, 2).bubble_fraction, expected)


@pytest.mark.parametrize("name", ["terapipe", "token-1f1b"])
@pytest.mark.parametrize("P", [1, 2, 3, 5, 8])
def test_token_schedules_bubble(name, P):
    for M in (1, 3, 8):
        for S in (1, 2, 7, 16):
            result = bubbles(name, P, M, S)
            assert_all(result.bubble_fraction, (P - 1) / (S * M + P - 1))


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_token_interleaved_bubble(P):
    for M in range(P, 9, P):
        for S in (2, 3, 7):
            result = bubbles("token-interleaved", P, M, S, 2)
            assert_all(result.bubble_fraction, (P - 1) / (2 * S * M + P - 1))


def test_terapipe_with_chunks_bubble_once_the_ring_is_full():
    for P in (2, 4):
        for M, S in ((2, 2), (1, 4), (3, 3)):
            assert_all(
                bubbles("terapipe", P, M, S, 2).bubble_fraction, (P - 1) / (2 * S * M + P - 1)
            )


def test_step_time_with_transfers():
    """One micro-batch through two stages: F, send, F, B, send back, B."""
    costs = dataclasses.replace(UNIFORM, transfer=lambda slice_len: 0.25)
    result = simulate(build_schedule("gpipe", 2, 1), [8], costs)
    assert result.step_time == pytest.approx(1 + 0.25 + 1 + 2 + 0.25 + 2)
    comm = [e for e in result.timeline.events if e.kind == "comm"]
    assert comm and all(e.end > e.start for e in comm)


def test_costs_see_slice_and_context_lengths():
    seen = []

    def forward(stage, chunk, slice_len, context_len):
        seen.append((slice_len, context_len))
        return slice_len + context_len / 10

    costs = ActionCosts(forward, lambda s, c, n, ctx: 2 * n, lambda n: 0.0)
    result = simulate(build_schedule("terapipe", 1, 1, 3), [4, 2, 2], costs)
    assert seen == [(4, 0), (2, 4), (2, 6)]
    assert result.step_time == pytest.approx(4 + 2.4 + 2.6 + 2 * 8)
    assert result.bubble_fraction == [0.0]


def test_context_makes_equal_slices_unequal():
    """Causal attention: the same length costs more later in the sequence, so equal slices
    leave a bubble larger than the formula and the last slices dominate."""

    def cost(stage, chunk, n, ctx):
        return n * (1 + (ctx + n) / 64)

    costs = ActionCosts(cost, lambda *a: 2 * cost(*a), lambda n: 0.0)
    result = simulate(build_schedule("terapipe", 4, 1, 4), [32] * 4, costs)
    assert min(result.bubble_fraction) > 3 / (4 + 3)


def test_from_stage_cost_model_split():
    class Model:
        name = "fake"

        def forward_backward_time(self, batch, slice_len, context_len):
            return 3.0 * batch * (slice_len + context_len)

        def p2p_time(self, batch, slice_len):
            return 0.5 * batch * slice_len

    costs = ActionCosts.from_stage_cost_model(Model(), batch=2, backward_ratio=2.0, num_chunks=3)
    assert costs.forward(0, 0, 4, 2) == pytest.approx(3.0 * 2 * 6 / 3 / 3)
    assert costs.backward(0, 0, 4, 2) == pytest.approx(3.0 * 2 * 6 * 2 / 3 / 3)
    assert costs.transfer(4) == pytest.approx(4.0)
    assert costs.name == "fake" and costs.time_unit == "s"
    with pytest.raises(ValueError, match="backward_ratio"):
        ActionCosts.from_stage_cost_model(Model(), backward_ratio=0)


def test_analytic_cost_model_plugs_in():
    from megatron_terapipe.slicing import cost_models
    model = cost_models.AnalyticCostModel(
        num_layers=24, hidden_size=2048, num_attention_heads=16, pipeline_model_parallel_size=4
    )
    costs = ActionCosts.from_stage_cost_model(model)
    even = simulate(build_schedule("terapipe", 4, 1, 4), [512] * 4, costs)
    one = simulate(build_schedule("gpipe", 4, 1), [2048], costs)
    assert 0 < even.step_time < one.step_time  # slicing shrinks the bubble of a lone micro-batch


@pytest.mark.parametrize(
    "name,P,M,S,V,expected",
    [
        ("gpipe", 4, 5, 1, 1, lambda p: 5),
        ("1f1b", 4, 5, 1, 1, lambda p: min(4 - p, 5)),
        ("1f1b", 4, 2, 1, 1, lambda p: min(4 - p, 2)),
        ("terapipe", 3, 2, 4, 1, lambda p: 8),
        ("terapipe", 3, 2, 2, 2, lambda p: 8),
        ("token-1f1b", 4, 3, 4, 1, lambda p: min(4 - p - 1 + 4, 12)),
        ("interleaved", 4, 4, 1, 2, lambda p: min(2 * (4 - p - 1) + 4 + 1, 8)),
    ],
)
def test_peak_activations(name, P, M, S, V, expected):
    result = simulate(build_schedule(name, P, M, S, V), [2] * S, UNIFORM)
    assert result.peak_activations == [expected(p) for p in range(P)]
    assert result.peak_activation_bytes is None


def test_peak_activation_bytes_come_from_the_memory_model_for_the_simulated_run():
    """The simulator hands its memory model the schedule it simulated, the slices of every
    micro-batch and the costs' batch, and reports the per-rank answer."""
    calls = []

    class Recorder:
        def rank_peaks(self, schedule, token_slices, batch_sizes):
            calls.append((schedule, token_slices, batch_sizes))
            return [float(10 * rank + 1) for rank in range(schedule.num_stages)]

    slices = [4, 3, 1]
    schedule = build_schedule("token-1f1b", 2, 2, 3)
    result = simulate(schedule, slices, dataclasses.replace(UNIFORM, memory=Recorder(),
                                                            batch=2))
    assert result.peak_activation_bytes == [1.0, 11.0]
    (seen, token_slices, batch_sizes), = calls
    assert seen is schedule and batch_sizes == [2, 2]
    assert [tuple(s) for s in token_slices] == [(4, 3, 1), (4, 3, 1)]
    assert simulate(schedule, slices, UNIFORM).peak_activation_bytes is None


def test_token_1f1b_holds_less_than_terapipe():
    terapipe = bubbles("terapipe", 4, 8, 4)
    token_1f1b = bubbles("token-1f1b", 4, 8, 4)
    assert token_1f1b.step_time == terapipe.step_time
    assert max(token_1f1b.peak_activations) < max(terapipe.peak_activations)


def test_result_dict_and_timeline_agree():
    result = bubbles("token-1f1b", 3, 2, 3)
    data = result.to_dict()
    for key in ("step_time", "bubble_fraction", "peak_activations", "mean_bubble_fraction"):
        assert key in data
    assert data["token_slices"] == [7, 7, 7] and data["time_unit"] == "units"
    assert result.timeline.bubble_fraction() == pytest.approx(result.bubble_fraction)
    assert result.timeline.step_time() == result.step_time
    computes = [e for e in result.timeline.events if e.kind != "comm"]
    assert len(computes) == 3 * 2 * 3 * 2


def test_wrong_slice_count():
    with pytest.raises(ValueError, match="for a schedule built with num_token_slices=3"):
        simulate(build_schedule("terapipe", 2, 1, 3), [4, 4], UNIFORM)
    with pytest.raises(ValueError, match="must be >= 1"):
        simulate(build_schedule("terapipe", 2, 1, 2), [4, 0], UNIFORM)
    with pytest.raises(ValueError, match="unknown p2p mode 'magic'; valid choices"):
        simulate(build_schedule("terapipe", 2, 1, 1), [4], UNIFORM, p2p="magic")


def test_deadlock_is_an_error_not_a_hang():
    """Rank 0 waits for the gradient before it sends the activation that produces it."""
    f, b = Compute("F", 0, 0), Compute("B", 0, 0)
    stages = (
        (G("recv_next", "B"), W("recv_next", "B"), f, G("send_next", "F"), b, W("send_next", "F")),
        (G("recv_prev", "F"), W("recv_prev", "F"), f, b, G("send_prev", "B"), W("send_prev", "B")),
    )
    with pytest.raises(ScheduleError, match="deadlock: stage 0 blocked"):
        simulate(Schedule("broken", 2, 1, 1, 1, stages), [4], UNIFORM)


def G(name, kind):
    return CommGroup((P2POp(name, kind, 0, 0, 0),))


def W(name, kind):
    return Wait((P2POp(name, kind, 0, 0, 0),))


# -- split backwards ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, S", [("1f1b", 1), ("token-1f1b", 1), ("token-1f1b", 3),
                                     ("terapipe", 4)])
@pytest.mark.parametrize("P", [2, 3, 5])
def test_split_backward_shortens_each_hop_of_the_backward_chain(name, S, P):
    """F = 1, B = 2 with a weight-gradient half of 1: the unsplit step is 3 (M S + P - 1). With
    W after the gradient's send, each of the P - 1 hops of the drain's backward chain takes the
    input-gradient half (1) instead of the whole backward (2), the bubble's only change: the
    step is one W per hop shorter, as in Zero Bubble's analysis of 1F1B with B/W split."""
    for M in (1, 2, 4, 6):
        plain = simulate(build_schedule(name, P, M, S), [7] * S, UNIFORM)
        split = simulate(build_schedule(name, P, M, S, split_backward=True), [7] * S, UNIFORM)
        assert plain.step_time == 3 * (M * S + P - 1)
        assert split.step_time == 3 * (M * S + P - 1) - (P - 1), (M, split.timeline)
        assert split.split_backward and not plain.split_backward


def test_split_backward_prices_w_by_the_cost_model():
    """`weight_grad` prices W; the split B costs the rest of the backward."""
    costs = ActionCosts(
        forward=lambda s, c, n, ctx: 1.0,
        backward=lambda s, c, n, ctx: 3.0,
        transfer=lambda n: 0.0,
        weight_grad=lambda s, c, n, ctx: 0.5,
    )
    result = simulate(build_schedule("terapipe", 2, 1, 2, split_backward=True), [4, 4], costs)
    durations = {(e.stage, e.kind, e.token_slice): e.end - e.start for e in result.timeline.events
                 if e.kind != "comm"}
    assert durations[(1, "B", 1)] == pytest.approx(2.5)
    assert durations[(1, "W", 1)] == pytest.approx(0.5)
    assert durations[(0, "B", 1)] == pytest.approx(3.0)  # first stage: not split
    # stage 1: F0 1-2, F1 2-3, B1 3-5.5, W1, B0 6-8.5; stage 0: B1 5.5-8.5, B0 8.5-11.5
    assert result.step_time == pytest.approx(1 + 1 + 1 + 2.5 + 3 + 3)
    with pytest.raises(ValueError, match="weight_grad_share"):
        ActionCosts(costs.forward, costs.backward, costs.transfer, weight_grad_share=1.5)
    too_big = dataclasses.replace(costs, weight_grad=lambda s, c, n, ctx: 4.0)
    with pytest.raises(ValueError, match="exceeds its whole backward"):
        simulate(build_schedule("terapipe", 2, 1, 2, split_backward=True), [4, 4], too_big)
