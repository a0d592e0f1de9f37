"""Known answers and properties of the planner: equal slices, finer with depth, memory cap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_terapipe.slicing import (
    ActivationMemoryModel,
    AnalyticCostModel,
    build_latency_table,
    equal_flops_slices,
    make_plan,
    predict_step_time,
    solve,
    step_objective,
)
from megatron_terapipe.slicing.memory import GIB
from megatron_terapipe.slicing.strategies import attention_to_linear_ratio
from megatron_terapipe.token_slices import equal_token_slices


def compositions(n: int):
    for mask in range(1 << (n - 1)):
        cuts = [i for i in range(1, n) if mask >> (i - 1) & 1]
        yield tuple(b - a for a, b in zip([0, *cuts], [*cuts, n]))


class LinearCost:
    """t = alpha + beta·l, blind to context: every slicing of n slices has the same Σ."""

    name = "linear"

    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = alpha, beta

    def forward_backward_time(self, batch, slice_len, context_len):
        return self.alpha + self.beta * slice_len * batch

    def p2p_time(self, batch, slice_len):
        return 0.0


def test_context_free_uniform_cost_gives_equal_slices():
    # n·3 + 12 + 4·(3 + 12/n) is least at n = 4 only; equal cuts then minimise the max.
    plan = make_plan(LinearCost(3.0, 1.0), seq_length=12, num_stages=5)
    assert plan.token_slices == (3, 3, 3, 3)
    assert plan.predicted_step_time == 48.0
    assert plan.t_max == 6.0


@settings(max_examples=40, deadline=None)
@given(alpha=st.integers(1, 20), beta=st.integers(1, 5), units=st.integers(1, 40),
       stages=st.integers(1, 64))
def test_context_free_cost_slices_are_as_equal_as_possible(alpha, beta, units, stages):
    plan = make_plan(LinearCost(alpha, beta), seq_length=units, num_stages=stages)
    n = plan.num_token_slices
    equal = equal_token_slices(units, n)
    assert max(plan.token_slices) == max(equal)
    step, _ = predict_step_time(LinearCost(alpha, beta), equal, stages)
    assert plan.predicted_step_time == step


def gpt(**overrides):
    dims = dict(num_layers=96, hidden_size=12288, num_attention_heads=96,
                tensor_model_parallel_size=8, pipeline_model_parallel_size=48)
    dims.update(overrides)
    return AnalyticCostModel.from_preset("v100", **dims), ActivationMemoryModel(
        **{k: v for k, v in dims.items() if k != "ffn_hidden_size"})


def test_more_stages_give_finer_slices():
    counts = []
    for stages in (1, 2, 4, 8, 16, 48):
        # The stage's layer count stays fixed: only the bubble weight (K-1) changes.
        model, _ = gpt(num_layers=2 * stages, pipeline_model_parallel_size=stages)
        plan = make_plan(model, seq_length=2048, num_stages=stages, batch=1, granularity=64)
        counts.append(plan.num_token_slices)
    assert counts == sorted(counts)
    assert counts[-1] >= 4 * counts[0]


def test_single_stage_never_slices_with_a_fixed_overhead():
    plan = make_plan(LinearCost(1.0, 1.0), seq_length=64, num_stages=1)
    assert plan.token_slices == (64,)


def test_later_slices_are_not_longer_when_context_costs():
    model = AnalyticCostModel.from_preset("h100", num_layers=4, hidden_size=1024,
                                          num_attention_heads=8, pipeline_model_parallel_size=4)
    plan = make_plan(model, seq_length=16384, num_stages=4, granularity=256)
    assert plan.num_token_slices > 1
    assert plan.token_slices[0] >= plan.token_slices[-1]


def test_dp_beats_or_ties_the_other_strategies():
    model, _ = gpt()
    kw = dict(seq_length=2048, num_stages=48, batch=2, granularity=16)
    best = make_plan(model, **kw)
    for strategy in ("equal", "equal-flops"):
        other = make_plan(model, strategy=strategy, **kw)
        assert best.predicted_step_time <= other.predicted_step_time + 1e-12
        assert other.strategy == strategy
    fixed = make_plan(model, strategy="equal", num_slices=8, **kw)
    assert fixed.token_slices == (256,) * 8


def test_batch_dp_reports_each_batch_slice_slicing():
    rng = np.random.default_rng(3)
    table = rng.integers(1, 9, size=(4, 7, 7)).astype(float)
    sol = solve(table, 6, batch=3)
    total, _, _ = step_objective(table, 6, sol.batch_slices, sol.token_units)
    assert total == sol.objective


def test_equal_flops_slices_shrink_and_balance():
    model, _ = gpt(num_layers=40, hidden_size=5120, num_attention_heads=40)
    ratio = attention_to_linear_ratio(model)
    slices = equal_flops_slices(32768, 16, 64, ratio)
    assert sum(slices) == 32768 and all(x % 64 == 0 for x in slices)
    assert list(slices) == sorted(slices, reverse=True)
    work = [x + ratio * (c * x + x * (x + 1) / 2) for x, c in zip(slices, np.cumsum((0,) + slices))]
    assert max(work) / min(work) < 1.05
    assert equal_flops_slices(64, 4, 16, 0.0) == (16, 16, 16, 16)


def test_equal_flops_needs_model_dims():
    with pytest.raises(ValueError, match="needs model dims"):
        make_plan(LinearCost(1, 1), seq_length=16, num_stages=2, strategy="equal-flops")


# -- granularity ------------------------------------------------------------------------------
def test_granularity_must_divide_seq_length():
    with pytest.raises(ValueError, match=r"granularity=7 does not divide seq_length=64.*1, 2, 4"):
        make_plan(LinearCost(1, 1), seq_length=64, num_stages=2, granularity=7)


def test_granularity_must_be_a_multiple_of_tp_under_sequence_parallel():
    with pytest.raises(ValueError, match="multiple of the tensor-model-parallel size 4"):
        make_plan(LinearCost(1, 1), seq_length=64, num_stages=2, granularity=2, multiple_of=4)
    plan = make_plan(LinearCost(1, 0.01), seq_length=64, num_stages=8, multiple_of=4)
    assert all(x % 4 == 0 for x in plan.token_slices)


def test_default_granularity_keeps_units_small():
    model, _ = gpt()
    plan = make_plan(model, seq_length=32768, num_stages=48)
    assert plan.extra["granularity"] == 128


# -- memory cap -------------------------------------------------------------------------------
def test_memory_cap_forces_fewer_slices_and_is_met():
    model, memory = gpt()
    kw = dict(seq_length=2048, num_stages=48, batch=2, granularity=8, memory=memory)
    free = make_plan(model, **kw)
    previous = free.num_token_slices
    for cap in (2.0, 1.5):
        plan = make_plan(model, memory_cap_gib=cap, **kw)
        assert plan.extra["activation_memory_gib"] <= cap
        assert plan.num_token_slices <= previous
        assert plan.predicted_step_time >= free.predicted_step_time
        previous = plan.num_token_slices
    assert previous < free.num_token_slices


def test_memory_cap_no_plan_fits_names_the_smallest():
    model, memory = gpt()
    pattern = r"no plan fits: smallest needs 1\.2\d\d GiB \(cap 1 GiB\)"
    with pytest.raises(ValueError, match=pattern):
        make_plan(model, seq_length=2048, num_stages=48, batch=2, granularity=8, memory=memory,
                  memory_cap_gib=1.0)


def test_memory_cap_is_near_exact_against_exhaustive_search():
    """Every DP plan fits the cap; and it is at least as good as the best plan that fits with
    the DP's rounding headroom (units/quanta of the cap) to spare."""
    model, memory = gpt(num_layers=48, pipeline_model_parallel_size=24)
    seq, g, stages, quanta = 1024, 128, 24, 64
    units = seq // g
    table = build_latency_table(model, 1, seq, g)
    held = memory.held_bytes("terapipe", (1,), seq, stages)

    def best_within(cap_bytes):
        best = math.inf
        for comp in compositions(units):
            slices = tuple(x * g for x in comp)
            if memory.peak_bytes("terapipe", (1,), (slices,), stages) <= cap_bytes:
                best = min(best, step_objective(table, stages, (1,), (comp,))[0])
        return best

    for cap_gib in np.linspace(held / GIB + 0.01, held / GIB + 0.3, 6):
        plan = make_plan(model, seq_length=seq, num_stages=stages, granularity=g,
                         memory=memory, memory_cap_gib=float(cap_gib), memory_quanta=quanta)
        cap = cap_gib * GIB
        assert plan.extra["activation_memory_gib"] * GIB <= cap * (1 + 1e-4)
        assert plan.predicted_step_time >= best_within(cap) - 1e-12
        slack = units * (cap - held) / quanta
        assert plan.predicted_step_time <= best_within(cap - slack) + 1e-12


def test_memory_cap_without_memory_model_is_an_error():
    with pytest.raises(ValueError, match="memory cap needs the model dims"):
        make_plan(LinearCost(1, 1), seq_length=16, num_stages=2, memory_cap_gib=1.0)


def test_too_fine_a_granularity_is_refused_with_the_least_valid_one():
    with pytest.raises(ValueError, match="use a granularity of at least 2"):
        make_plan(LinearCost(1, 1), seq_length=8192, num_stages=2, granularity=1)
