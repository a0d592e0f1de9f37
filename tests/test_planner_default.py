"""`--token-pipeline-slices auto` with the default cost model: a start-up profile of the stage.

The profile is timed, so nothing here checks times: the checks are that the default is the
profile (one layer of the real stage, scaled to the stage), that the plan is a valid slicing,
and that the plan's predicted step time is what a brute-force evaluation of the same cost model
gives - the best of every slicing for TeraPipe's order (the DP is exact there), and no worse than
any equal slicing for token-1f1b (scored by the simulator).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from megatron_terapipe.arguments import DEFAULT_COST_MODEL
from megatron_terapipe.slicing import (
    AnalyticCostModel,
    ProfiledCostModel,
    cost_model_from_args,
    make_plan,
    plan_from_args,
    predict_step_time,
)
from megatron_terapipe.slicing.megatron_args import EQUAL_PREFERENCE
from megatron_terapipe.slicing.strategies import simulator_scorer
from megatron_terapipe.token_slices import equal_token_slices

SEQ, G = 64, 8


def tiny_args(**overrides) -> SimpleNamespace:
    """A validated pretrain_gpt.py namespace's planner fields (4 layers, PP = 2, M = 4)."""
    args = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=None,
        group_query_attention=False, ffn_hidden_size=None, seq_length=SEQ,
        micro_batch_size=1, global_batch_size=4, data_parallel_size=1,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=2, sequence_parallel=False,
        padded_vocab_size=64, swiglu=False, virtual_pipeline_model_parallel_size=None,
        token_pipeline_slices="auto", token_pipeline_granularity=G,
        token_pipeline_cost_model=DEFAULT_COST_MODEL, token_pipeline_memory_cap=None,
        token_pipeline_schedule="terapipe",
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def compositions(units: int):
    for cuts in itertools.product((0, 1), repeat=units - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [units]
        yield tuple(G * (b - a) for a, b in zip(bounds, bounds[1:]))


def _plan_with_default(rank: int, world_size: int) -> dict:
    args = tiny_args()
    cost = cost_model_from_args(args)  # the default: profile this stage now
    out = {"cost": cost.to_dict(), "plans": {}}
    for schedule in ("terapipe", "token-1f1b"):
        args.token_pipeline_schedule = schedule
        plan = plan_from_args(args, cost_model=cost)
        out["plans"][schedule] = plan.to_dict()
    return out


@pytest.fixture(scope="module")
def profiled():
    from megatron_terapipe.compat import run_distributed

    (out,) = run_distributed(_plan_with_default, 1, timeout_s=300.0)
    return out


def test_the_default_cost_model_profiles_one_layer_of_the_stage(profiled):
    assert DEFAULT_COST_MODEL == "profile"
    meta = profiled["cost"]["meta"]
    assert meta["dims"]["layers_per_stage"] == 2 and meta["profiled_layers"] == 1
    assert meta["profile_seconds"] > 0 and profiled["cost"]["backward_ratio"] > 0
    assert profiled["cost"]["p2p_bytes_per_token"] == 32 * 4  # fp32 activations of hidden 32
    for schedule, plan in profiled["plans"].items():
        assert plan["cost_model"] == "profile:start-up", schedule
        assert plan["extra"]["profile_seconds"] == meta["profile_seconds"]


def test_default_plans_are_valid_and_brute_force_consistent(profiled):
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the profile, as a user would save it
        path = os.path.join(tmp, "profile.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(profiled["cost"], handle)
        cost = ProfiledCostModel.load(path)
    terapipe, one_f_one_b = profiled["plans"]["terapipe"], profiled["plans"]["token-1f1b"]
    for plan in (terapipe, one_f_one_b):
        assert sum(plan["token_slices"]) == SEQ
        assert all(x > 0 and x % G == 0 for x in plan["token_slices"])

    # TeraPipe's order: the DP is exact, so its plan is the best of all 2^7 slicings; an equal
    # slicing replaces it only within EQUAL_PREFERENCE.
    times = {s: predict_step_time(cost, s, 2, (1,) * 4)[0] for s in compositions(SEQ // G)}
    best = min(times.values())
    dp = terapipe["extra"].get("dp_predicted_step_time", terapipe["predicted_step_time"])
    assert dp == pytest.approx(best, rel=1e-9)
    chosen = times[tuple(terapipe["token_slices"])]
    assert chosen == pytest.approx(terapipe["predicted_step_time"], rel=1e-9)
    assert chosen <= best * (1 + EQUAL_PREFERENCE) + 1e-12

    # token-1f1b: the prediction is the simulator's on this very slicing, and no equal slicing
    # predicts faster.
    score = simulator_scorer(cost, "token-1f1b", 2, 4, 1)
    predicted = one_f_one_b["predicted_step_time"]
    assert predicted == pytest.approx(score(tuple(one_f_one_b["token_slices"])), rel=1e-9)
    for n in range(1, SEQ // G + 1):
        assert predicted <= score(equal_token_slices(SEQ, n, G)) * (1 + 1e-12), n


def test_default_falls_back_to_analytic_under_tensor_parallelism():
    """One rank cannot time a TP group: the default plans with the data sheet and says so."""
    args = tiny_args(tensor_model_parallel_size=2, token_pipeline_schedule="terapipe")
    cost = cost_model_from_args(args)
    assert isinstance(cost, AnalyticCostModel)
    plan = plan_from_args(args, cost_model=cost)
    assert "TP = 2" in plan.extra["cost_model_note"] and plan.cost_model.startswith("analytic")
    assert sum(plan.token_slices) == SEQ


def test_the_measured_backward_ratio_prices_the_simulator():
    """A profile's backward/forward ratio reaches the simulator's action costs (a case where
    the split matters: 4 stages, uneven slices)."""
    samples = [(1, n, c, 1e-3 * n + 1e-6 * n * c + 2e-3) for n in (8, 32, 64)
               for c in (0, 16, 32) if n + c <= SEQ]
    slices = (40, 8, 8, 8)
    measured = ProfiledCostModel.fit(samples, backward_ratio=1.0, p2p_latency_s=1e-3)
    default = ProfiledCostModel.fit(samples, p2p_latency_s=1e-3)
    assert default.backward_ratio == 2.0
    by_profile = simulator_scorer(measured, "token-1f1b", 4, 4, 1)(slices)
    assert by_profile == simulator_scorer(default, "token-1f1b", 4, 4, 1, backward_ratio=1.0)(
        slices)
    assert by_profile != pytest.approx(simulator_scorer(default, "token-1f1b", 4, 4, 1)(slices))


class _QuadraticCost:
    """t = b·l + c·l·(ctx + l/2) per slice, a fixed P2P time per message."""

    name = "quadratic"

    def forward_backward_time(self, batch, slice_len, context_len):
        return 3.0 * slice_len + 0.1 * slice_len * (context_len + slice_len / 2)

    def p2p_time(self, batch, slice_len):
        return 3.0


def test_simulator_scored_plans_are_never_slower_than_an_equal_slicing():
    """The formula's shortlist can miss the equal slicing the simulator prefers (here it keeps
    only its best candidate); equal slicings of up to 16 slices are simulated regardless."""
    cost = _QuadraticCost()
    plan = make_plan(cost, seq_length=SEQ, num_stages=2, batch=1, batch_mode="fixed",
                     num_microbatches=1, schedule="token-1f1b", score="simulator",
                     simulator_candidates=1, granularity=4)
    score = simulator_scorer(cost, "token-1f1b", 2, 1, 1)
    assert plan.predicted_step_time == pytest.approx(score(plan.token_slices), rel=1e-12)
    for n in range(1, 17):
        assert plan.predicted_step_time <= score(equal_token_slices(SEQ, n, 4)) + 1e-9, n


class _FixedPlusQuadraticCost(_QuadraticCost):
    """t = a + l + c·l·(ctx + l/2): a fixed cost per slice against a context cost."""

    def __init__(self, fixed: float, context: float) -> None:
        self.fixed, self.context = fixed, context

    def forward_backward_time(self, batch, slice_len, context_len):
        return self.fixed + slice_len + self.context * slice_len * (context_len + slice_len / 2)

    def p2p_time(self, batch, slice_len):
        return 0.0


@pytest.mark.parametrize("fixed, equal_wins", [(1.0, True), (4.0, False)])
def test_auto_prefers_equal_slices_unless_the_dp_gains_enough(fixed, equal_wins):
    """`auto` keeps the DP's uneven slicing only when it is predicted more than EQUAL_PREFERENCE
    faster than every equal slicing (brute force over N = 1..8 slices of whole granules,
    through the flag's explicit-list path)."""
    cost = _FixedPlusQuadraticCost(fixed, 0.05)
    args = tiny_args(token_pipeline_schedule="token-1f1b")
    plan = plan_from_args(args, cost_model=cost)
    equal = {n: plan_from_args(tiny_args(
        token_pipeline_schedule="token-1f1b",
        token_pipeline_slices=",".join(map(str, equal_token_slices(SEQ, n, G))) + ","),
        cost_model=cost) for n in range(1, SEQ // G + 1)}
    best = min(equal.values(), key=lambda p: p.predicted_step_time)
    if equal_wins:
        assert plan.strategy == "dp, equal preferred" and plan.token_slices == best.token_slices
        dp = plan.extra["dp_predicted_step_time"]
        assert dp < best.predicted_step_time <= dp * (1 + EQUAL_PREFERENCE)
        assert plan.extra["dp_token_slices"] != list(best.token_slices)
    else:
        assert plan.strategy == "dp" and len(set(plan.token_slices)) > 1
        assert plan.predicted_step_time * (1 + EQUAL_PREFERENCE) < best.predicted_step_time
