"""Cost models: analytic FLOPs, latency-table files, TeraPipe's fitted profile."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from megatron_terapipe.slicing import (
    DEVICE_PRESETS,
    AnalyticCostModel,
    LatencyTableCostModel,
    ProfiledCostModel,
    StageCostModel,
    build_latency_table,
    default_grid,
    make_plan,
    profile_stage,
)


def small(**kw):
    dims = dict(num_layers=8, hidden_size=1024, num_attention_heads=16,
                pipeline_model_parallel_size=4)
    dims.update(kw)
    return AnalyticCostModel.from_preset("a100", **dims)


# -- analytic ---------------------------------------------------------------------------------
def test_analytic_flops_match_hand_count():
    model = small()
    h, f, layers = 1024, 4096, 2
    assert model.layers_per_stage == layers
    linear = 2 * 3 * 128 * (h * 3 * h + h * h + 2 * h * f)
    attention = 4 * 3 * h * 128 * (256 + 128)
    assert model.forward_flops(3, 128, 256) == pytest.approx(linear + attention)
    rates = DEVICE_PRESETS["a100"]
    compute = 3 * (linear + attention) / (rates.peak_tflops * 1e12 * rates.efficiency)
    weights = 3 * model.params_per_layer * 2 / (rates.mem_bandwidth_gbps * 1e9)
    expected = layers * (max(compute, weights) + rates.overhead_s)
    assert model.forward_backward_time(3, 128, 256) == pytest.approx(expected)


def test_analytic_grows_with_length_and_context_and_shrinks_with_tp():
    model = small()
    assert isinstance(model, StageCostModel)
    t = model.forward_backward_time
    assert t(1, 2048, 0) < t(1, 4096, 0) < t(1, 4096, 4096) < t(2, 4096, 4096)
    split = small(tensor_model_parallel_size=4, tp_bandwidth_gbps=1e9)
    assert split.forward_backward_time(1, 8192, 0) < 0.3 * t(1, 8192, 0)
    # Thin slices sit on the weight-read floor: halving them saves nothing.
    assert t(1, 8, 0) == pytest.approx(t(1, 16, 0))


def test_analytic_gqa_and_swiglu_change_parameters():
    base = small()
    assert small(num_query_groups=4).params_per_layer < base.params_per_layer
    assert small(gated_linear_unit=True).params_per_layer > base.params_per_layer


def test_analytic_p2p_and_sequence_parallel():
    model = small(tensor_model_parallel_size=4)
    sp = small(tensor_model_parallel_size=4, sequence_parallel=True)
    nbytes = 2 * 1024 * 1024 * 2
    assert model.p2p_time(2, 1024) == pytest.approx(
        model.link_latency_s + nbytes / (model.link_bandwidth_gbps * 1e9))
    assert sp.p2p_time(2, 1024) < model.p2p_time(2, 1024)


def test_analytic_array_calls_match_scalar_calls():
    model = small()
    b, n, c = np.array([1, 2, 3]), np.array([64, 128, 256]), np.array([0, 512, 1024])
    vector = model.forward_backward_time(b, n, c)
    assert vector == pytest.approx([model.forward_backward_time(*x) for x in zip(b, n, c)])


def test_analytic_from_args_and_bad_values():
    args = SimpleNamespace(num_layers=24, hidden_size=2048, num_attention_heads=16,
                           num_query_groups=None, ffn_hidden_size=None,
                           tensor_model_parallel_size=2, pipeline_model_parallel_size=3,
                           sequence_parallel=True, swiglu=False)
    model = AnalyticCostModel.from_args(args, preset="h100")
    assert model.name == "analytic:h100" and model.layers_per_stage == 8
    assert model.ffn_hidden_size == 8192 and model.num_query_groups == 16
    with pytest.raises(ValueError, match="unknown device preset 'tpu'.*cpu, h100, v100"):
        AnalyticCostModel.from_preset("tpu", num_layers=1, hidden_size=8, num_attention_heads=2)
    with pytest.raises(ValueError, match="hidden_size=10 is not a multiple"):
        AnalyticCostModel(num_layers=1, hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="efficiency must be > 0"):
        small(efficiency=0.0)


def test_build_latency_table_layout():
    model = small()
    table = build_latency_table(model, 2, 1024, 128)
    assert table.shape == (3, 9, 9)
    assert np.isinf(table[0]).all() and np.isinf(table[:, 0]).all()
    assert np.isinf(table[1, 5, 4]) and np.isfinite(table[1, 4, 4])
    expected = model.forward_backward_time(2, 384, 256) + 2 * model.p2p_time(2, 384)
    assert table[2, 3, 2] == pytest.approx(expected)
    with pytest.raises(ValueError, match="granularity=100 does not divide seq_length=1024"):
        build_latency_table(model, 1, 1024, 100)


def test_build_latency_table_calls_scalar_models_one_by_one():
    class Scalar:
        name = "scalar"

        def forward_backward_time(self, batch, slice_len, context_len):
            assert isinstance(slice_len, int)
            return batch * slice_len + 0.5 * context_len

        def p2p_time(self, batch, slice_len):
            return 0.0

    table = build_latency_table(Scalar(), 1, 4, 1)
    assert table[1, 2, 1] == 2.5


# -- latency tables ---------------------------------------------------------------------------
def write_table(path, latency, granularity=4, seq_length=None, **more):
    seq_length = (latency.shape[1] - 1) * granularity if seq_length is None else seq_length
    np.savez(path, latency=latency, granularity=granularity, seq_length=seq_length, **more)
    return path


def test_latency_table_roundtrip_and_plan(tmp_path):
    model = small()
    table = LatencyTableCostModel.from_cost_model(model, 2, 1024, 64)
    table.save(tmp_path / "t.npz")
    loaded = LatencyTableCostModel.load(tmp_path / "t.npz")
    assert loaded.max_batch == 2 and loaded.units == 16 and loaded.name == "table:t.npz"
    assert loaded.forward_backward_time(2, 128, 256) == pytest.approx(
        model.forward_backward_time(2, 128, 256))
    kw = dict(seq_length=1024, num_stages=4, batch=2, granularity=64)
    assert make_plan(loaded, **kw).predicted_step_time == pytest.approx(
        make_plan(model, **kw).predicted_step_time)
    # A coarser granularity reads every other entry.
    coarse = make_plan(loaded, **dict(kw, granularity=128))
    assert all(x % 128 == 0 for x in coarse.token_slices)
    with pytest.raises(ValueError, match="must be a multiple of the latency table's granularity"):
        make_plan(loaded, **dict(kw, granularity=32))


def test_latency_table_lookup_errors():
    table = LatencyTableCostModel(np.ones((2, 5, 5)), 4, 16)
    assert table.p2p_time(1, 8) == 0.0
    with pytest.raises(ValueError, match="slice_len=6 is not a multiple"):
        table.forward_backward_time(1, 6, 0)
    with pytest.raises(ValueError, match="batch=2 is outside the latency table's range 1..1"):
        table.forward_backward_time(2, 4, 0)
    with pytest.raises(ValueError, match="does not fit seq_length=16"):
        table.forward_backward_time(1, 8, 12)


@pytest.mark.parametrize(
    "latency, scalars, message",
    [
        (np.ones((2, 5, 6)), {}, r"latency has shape \[2, 5, 6\].*needs \[B\+1, 5, 5\]"),
        (np.ones((2, 5, 5)), {"seq_length": 20}, r"20 / granularity=4 = 5 units needs"),
        (np.ones((2, 5, 5)), {"seq_length": 18}, "not a positive multiple of granularity=4"),
        (np.ones((1, 5, 5)), {}, "with B >= 1"),
        (np.ones((5, 5)), {}, "must be 3-D"),
        (np.where(np.eye(5)[None] > 0, np.nan, 1.0).repeat(2, 0), {}, r"NaN \(first at"),
        (-np.ones((2, 5, 5)), {}, "negative values"),
        (np.full((2, 5, 5), np.inf), {}, "every latency entry is inf"),
        (np.ones((2, 5, 5)), {"granularity": 2.5}, "granularity must be an integer"),
    ],
)
def test_bad_latency_tables_are_rejected(tmp_path, latency, scalars, message):
    path = write_table(tmp_path / "bad.npz", latency, **scalars)
    with pytest.raises(ValueError, match=message) as err:
        LatencyTableCostModel.load(path)
    assert "bad.npz" in str(err.value)


def test_latency_table_missing_keys_and_file(tmp_path):
    np.savez(tmp_path / "x.npz", latency=np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r"lacks \['granularity', 'seq_length'\]"):
        LatencyTableCostModel.load(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="does not exist"):
        LatencyTableCostModel.load(tmp_path / "nope.npz")
    write_table(tmp_path / "p.npz", np.ones((2, 3, 3)), p2p=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"p2p has shape \[2, 2\], expected \[2, 3\]"):
        LatencyTableCostModel.load(tmp_path / "p.npz")


# -- profiled ---------------------------------------------------------------------------------
def synthetic(b, n, c):
    """A stage whose true latency has TeraPipe's form, so the fit must recover it."""
    t0 = 1e-3 + 2e-6 * b * n + 1e-9 * b * n * n
    return t0 + (c > 0) * (3e-8 * b * n + 1e-8 * b * c + 4e-10 * b * n * c)


def test_profile_fit_recovers_a_model_of_its_own_form(tmp_path):
    grid = default_grid(1024, max_batch=3, granularity=16, num_lens=9, num_contexts=6)
    assert grid.batches == (1, 2, 3) and grid.slice_lens[0] == 16 and grid.slice_lens[-1] == 1024
    calls = []

    def measure(b, n, c):
        calls.append((b, n, c))
        return synthetic(b, n, c)

    prof = profile_stage(measure, grid, meta={"device": "synthetic"})
    assert len(calls) == len(grid.points())
    assert prof.r2 == pytest.approx(1.0, abs=1e-9)
    assert prof.r2_context == pytest.approx(1.0, abs=1e-9)
    assert prof.context_coef == pytest.approx((3e-8, 1e-8, 4e-10), rel=1e-6)
    for point in grid.points():
        assert prof.forward_backward_time(*point) == pytest.approx(synthetic(*point), rel=1e-9)
    # Between grid points t0 is interpolated: close, not exact.
    assert prof.forward_backward_time(2, 100, 300) == pytest.approx(synthetic(2, 100, 300),
                                                                     rel=0.05)
    prof.save(tmp_path / "prof.json")
    loaded = ProfiledCostModel.load(tmp_path / "prof.json")
    assert loaded.name == "profile:prof.json" and loaded.r2 == prof.r2
    assert loaded.meta["device"] == "synthetic" and len(loaded.meta["samples"]) == len(calls)
    b, n, c = np.array([1, 3]), np.array([48, 512]), np.array([0, 256])
    assert loaded.forward_backward_time(b, n, c) == pytest.approx(
        prof.forward_backward_time(b, n, c))


def test_profile_with_noise_reports_lower_r2_and_still_plans():
    rng = np.random.default_rng(0)
    grid = default_grid(512, 1, 16)
    prof = profile_stage(lambda b, n, c: synthetic(b, n, c) * rng.uniform(0.7, 1.3), grid)
    assert 0.0 < prof.r2 < 1.0
    plan = make_plan(prof, seq_length=512, num_stages=4, granularity=16)
    assert sum(plan.token_slices) == 512 and plan.cost_model == "profile:<fit>"


def test_profile_takes_the_least_of_repeats_over_shuffled_passes():
    calls: dict = {}
    order = []

    def measure(b, n, c):
        calls[b, n, c] = calls.get((b, n, c), 0) + 1
        order.append((b, n, c))
        return (3.0, 1.0, 2.0)[calls[b, n, c] - 1]

    grid = default_grid(256, 1, 32, num_lens=3, num_contexts=2)
    prof = profile_stage(measure, grid, repeats=3)
    assert np.all(prof.no_context == 1.0)
    assert set(calls.values()) == {3}
    points = len(grid.points())
    assert order[:points] != order[points : 2 * points]  # each pass in its own order


def test_profile_fit_errors(tmp_path):
    with pytest.raises(ValueError, match="zero samples"):
        ProfiledCostModel.fit([])
    with pytest.raises(ValueError, match="lacks a context-0 sample for batch=2, slice_len=8"):
        ProfiledCostModel.fit([(1, 8, 0, 1.0), (1, 16, 0, 2.0), (2, 16, 0, 3.0)])
    with pytest.raises(ValueError, match="finite and >= 0"):
        ProfiledCostModel.fit([(1, 8, 0, -1.0)])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a latency profile"):
        ProfiledCostModel.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="cannot read latency profile"):
        ProfiledCostModel.load(tmp_path / "missing.json")


def test_profile_single_batch_scales_linearly():
    prof = ProfiledCostModel.fit([(2, 8, 0, 1.0), (2, 16, 0, 2.0), (2, 8, 8, 1.5)])
    assert prof.no_context_time(4, 16) == pytest.approx(4.0)
    assert prof.no_context_time(2, 32) == pytest.approx(4.0)  # extrapolated from the end


def test_profile_context_weights_are_never_negative():
    # Noise made context look cheaper: the fit must not learn a negative context cost.
    samples = [(1, n, 0, 1e-3 * n) for n in (8, 16, 32)]
    samples += [(1, n, c, 1e-3 * n - 1e-6 * c) for n in (8, 16) for c in (8, 16)]
    samples += [(1, 8, 24, 8e-3 + 5e-6 * 24)]
    prof = ProfiledCostModel.fit(samples)
    assert all(w >= 0 for w in prof.context_coef)
    assert prof.forward_backward_time(1, 16, 16) >= prof.forward_backward_time(1, 16, 0)


def test_weight_grad_fraction_is_the_linear_share_of_the_backward():
    """Hand count: W = the linear layers' forward FLOPs again; the backward is twice the
    forward (linear + attention); attention has no weights."""
    model = small()
    h, f = 1024, 4096
    linear = 2 * 3 * 128 * (h * 3 * h + h * h + 2 * h * f)
    attention = 4 * 3 * h * 128 * (256 + 128)
    assert model.weight_grad_fraction(3, 128, 256) == pytest.approx(
        linear / (2 * (linear + attention)))
    # more context: more attention, a smaller share; no context and tiny slices: near 1/2
    assert model.weight_grad_fraction(1, 128, 4096) < model.weight_grad_fraction(1, 128, 0)
    assert model.weight_grad_fraction(1, 1, 0) == pytest.approx(0.5, abs=1e-3)


def test_planner_scores_split_backwards_as_the_split_schedule():
    """Simulator scoring of the same slicing: the split schedule is shorter at P = 4 (three
    hops, each one W shorter) and the plan records that it was scored split."""
    from megatron_terapipe.slicing.strategies import simulator_scorer

    model = small()
    slices = (512, 512, 512, 512)
    plain = simulator_scorer(model, "token-1f1b", 4, 2, 1)(slices)
    split = simulator_scorer(model, "token-1f1b", 4, 2, 1, split_backward=True,
                             flops_model=model)(slices)
    assert 0 < split < plain
    plan = make_plan(model, seq_length=2048, num_stages=4, schedule="token-1f1b",
                     num_microbatches=2, score="simulator", split_backward=True,
                     flops_model=model, strategy="equal", num_slices=4, batch_mode="fixed")
    assert plan.predicted_step_time == pytest.approx(split)
