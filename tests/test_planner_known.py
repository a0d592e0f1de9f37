"""Known answers and properties of the planner: equal slices, finer with depth, memory cap."""

from __future__ import annotations

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
# The cap is checked with the memory model's walk of each candidate's schedule (its agreement
# with measured peaks is tests/test_memory_model.py's); here the search under it is checked
# against exhaustive search over every slicing of a short sequence.
# Slices down to 1/12 of the sequence: thin enough for the first backward's accumulators to
# outweigh what the last slice frees, so the cap has plans to tell apart.
CAP_SEQ, CAP_G = 768, 64


def _cap_case(schedule, microbatches=1):
    model, memory = gpt(num_layers=4, pipeline_model_parallel_size=2)
    stages, units = 2, CAP_SEQ // CAP_G
    table = build_latency_table(model, 1, CAP_SEQ, CAP_G)
    batch_slices = (1,) * microbatches
    rows = []
    for comp in compositions(units):
        slices = tuple(x * CAP_G for x in comp)
        peak = memory.peak_bytes(schedule, batch_slices, (slices,) * microbatches, stages)
        objective = step_objective(table, stages, batch_slices, (comp,) * microbatches)[0]
        rows.append((peak, objective, slices))
    kw = dict(seq_length=CAP_SEQ, num_stages=stages, granularity=CAP_G, memory=memory,
              schedule=schedule, batch_mode="fixed", num_microbatches=microbatches)
    return model, rows, kw


def test_memory_cap_is_exact_for_terapipe_against_exhaustive_search():
    """terapipe's peak depends on the last slice only, so the capped plan is the exhaustive
    optimum among the slicings that fit, for caps across the whole range of peaks."""
    model, rows, kw = _cap_case("terapipe", microbatches=2)
    peaks = sorted({peak for peak, _, _ in rows})
    assert len(peaks) >= 2  # the cap has something to decide
    free = make_plan(model, **kw)
    for cap in np.linspace(peaks[0], peaks[-1], 7)[:-1]:
        cap_gib = float(cap) / GIB * (1 + 1e-9)
        plan = make_plan(model, memory_cap_gib=cap_gib, **kw)
        best = min(objective for peak, objective, _ in rows if peak <= cap_gib * GIB)
        assert plan.extra["activation_memory_gib"] <= round(cap_gib, 4) + 1e-4
        assert plan.objective == pytest.approx(best, rel=1e-12)
        assert plan.objective >= free.objective
    # A cap below the DP's optimum's peak changes the plan and says why.
    assert "over the cap" in make_plan(model, memory_cap_gib=peaks[0] / GIB * (1 + 1e-9),
                                       **kw).extra["memory_cap_note"]


def test_memory_cap_plan_fits_and_beats_every_fitting_equal_slicing_for_1f1b_orders():
    """token-1f1b's peak also depends on the first slices (later micro-batches start while
    the first is in flight): no exactness claim, but the plan fits and is at least as good
    as any equal slicing that fits (those are among its candidates)."""
    model, rows, kw = _cap_case("token-1f1b", microbatches=4)
    equal = sorted((peak, objective) for peak, objective, slices in rows
                   if len(set(slices)) == 1)
    assert len({peak for peak, _ in equal}) > 2
    for cap, _ in equal[:-1]:
        cap_gib = cap / GIB * (1 + 1e-9)
        plan = make_plan(model, memory_cap_gib=cap_gib, **kw)
        assert plan.extra["activation_memory_gib"] <= round(cap_gib, 4) + 1e-4
        fitting = [objective for peak, objective in equal if peak <= cap_gib * GIB]
        assert plan.objective <= min(fitting) + 1e-12


def test_memory_cap_tries_other_batch_splits_and_the_step_objective():
    """TeraPipe's batch DP splits a batch of 2 its own way; when that plan is over the cap,
    splitting the batch in two sequences may fit with almost the same step time, and the
    capped search must find at least that (the DP optimum of the (1, 1) split)."""
    model, memory = gpt()
    kw = dict(seq_length=2048, num_stages=48, batch=2, granularity=8, memory=memory)
    free = make_plan(model, **kw)
    cap = free.extra["activation_memory_gib"] * 0.999
    table = build_latency_table(model, 2, 2048, 8)
    split = solve(table, 48, batch_mode="fixed", batch_slices=(1, 1))
    slices = tuple(u * 8 for u in split.token_units[0])
    split_peak = memory.peak_bytes("terapipe", (1, 1), (slices, slices), 48) / GIB
    assert split_peak <= cap < free.extra["activation_memory_gib"]
    plan = make_plan(model, memory_cap_gib=cap, **kw)
    assert plan.extra["activation_memory_gib"] <= round(cap, 4) + 1e-4
    assert plan.objective <= split.objective * (1 + 1e-12)


def test_memory_cap_no_plan_fits_names_the_smallest():
    model, rows, kw = _cap_case("terapipe")
    smallest = min(peak for peak, _, _ in rows) / GIB
    pattern = (rf"no plan fits: smallest needs {smallest:.3f} GiB \(cap {smallest / 2:g} GiB\) "
               r"of activations per stage, of the \d+ slicings the planner tried")
    with pytest.raises(ValueError, match=pattern):
        make_plan(model, memory_cap_gib=smallest / 2, **kw)


def test_memory_cap_without_memory_model_is_an_error():
    with pytest.raises(ValueError, match="memory cap needs the model dims"):
        make_plan(LinearCost(1, 1), seq_length=16, num_stages=2, memory_cap_gib=1.0)


def test_too_fine_a_granularity_is_refused_with_the_least_valid_one():
    with pytest.raises(ValueError, match="use a granularity of at least 2"):
        make_plan(LinearCost(1, 1), seq_length=8192, num_stages=2, granularity=1)
