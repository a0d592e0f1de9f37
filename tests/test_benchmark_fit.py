"""Pure parts of the benchmark: cost fit, bubble of measured records, tables (no processes)."""

import math

import numpy as np

from megatron_terapipe.benchmark.fit import fit_cost_model, fit_slice_times
from megatron_terapipe.benchmark.measured import Measured
from megatron_terapipe.benchmark.predict import measured_timeline, schedule_of
from megatron_terapipe.benchmark.table import format_rows
from megatron_terapipe.schedules.executor import ActionRecord


def test_fit_recovers_known_slice_costs():
    a, b, c = 2e-3, 1e-5, 3e-8
    points = [(n, ctx, a + b * n + c * n * (ctx + n / 2))
              for n in (64, 128, 256, 512) for ctx in (0, 256, 1024)]
    fit = fit_slice_times(points)
    assert np.allclose(fit.coef, (a, b, c), rtol=1e-6)
    assert fit.r2 > 0.999999


def test_fitted_model_prices_every_stage_and_kind():
    def rec(kind, t, start, dur):
        return ActionRecord(kind, 0, t, 0, start, start + dur)

    slices = (128, 128)
    per_rank = [[rec("F", 0, 0.0, 1.0), rec("F", 1, 1.0, 1.5), rec("B", 1, 3, 3.0),
                 rec("B", 0, 6, 2.0)]] * 2
    model = fit_cost_model([(slices, per_rank)], num_stages=2, hidden_size=8)
    assert math.isclose(model.action_time("F", 0, 128, 128), 1.5, rel_tol=1e-6)
    assert math.isclose(model.action_time("B", 1, 128, 0), 2.0, rel_tol=1e-6)
    assert math.isclose(model.forward_backward_time(1, 128, 0), 3.0, rel_tol=1e-6)


def _measured(timeline, kind="token", schedule="terapipe", slices=(64, 64)):
    return Measured(name="x", kind=kind, schedule=schedule, token_slices=slices,
                    step_times=[1.0], median_round=0, timeline=timeline, cpu_time=[1.0, 1.0],
                    peak_activation_bytes=[1, 1], cuda_peak_bytes=[None, None], losses=None)


def test_measured_bubble_is_idle_share_of_the_aligned_span():
    # stage 0 busy 0-1 and 3-4, stage 1 busy 1-3; span 4
    timeline = [[ActionRecord("F", 0, 0, 0, 0.0, 1.0), ActionRecord("B", 0, 0, 0, 3.0, 4.0)],
                [ActionRecord("F", 0, 0, 0, 1.0, 2.0), ActionRecord("comm", -1, -1, -1, 2.0, 2.1),
                 ActionRecord("B", 0, 0, 0, 2.1, 3.0)]]
    bubbles = measured_timeline(_measured(timeline, slices=(128,))).bubble_fraction()
    assert np.allclose(bubbles, [0.5, 1 - 1.9 / 4])


def test_stock_variants_map_to_their_ir_twins():
    m = _measured([[], []], kind="stock-1f1b", schedule="stock-1f1b", slices=(128,))
    assert schedule_of(m, 4).name == "1f1b"
    m.kind, m.virtual_pipeline = "stock-interleaved", 2
    assert schedule_of(m, 4).name == "interleaved"


def test_table_lists_every_row():
    row = {"schedule": "stock 1F1B", "num_token_slices": 1, "step_time": 1.0, "tokens_per_s": 2.0,
           "speedup": 1.0, "bubble_measured": [0.1, 0.2], "bubble_simulated": [0.1, 0.25],
           "peak_activation_mib": [3.0, None], "predicted_step_time": 1.1,
           "prediction_error": 0.1, "max_loss_diff": 0.0}
    text = format_rows([row, {**row, "schedule": "terapipe S=8"}])
    assert "terapipe S=8" in text and "10.0%/20.0%" in text and "+10.0%" in text


def _panel_limits(timelines, tmp_path):
    """The x-limits of each Gantt panel `plot_timelines` drew (and that it wrote a PNG)."""
    from megatron_terapipe.simulate import plot_timelines

    path = tmp_path / "t.png"
    figure = plot_timelines(timelines, str(path), "title")
    assert path.stat().st_size > 1000
    return [tuple(ax.get_xlim()) for ax in figure.axes[: len(timelines)]]


def _one_event_timeline(kind, end, label):
    from megatron_terapipe.simulate import Timeline, TimelineEvent

    return Timeline([TimelineEvent(0, kind, 0, 0, 0, 0.0, end)], num_stages=1, label=label)


def test_aligned_plot_spans_the_longest_timeline_in_every_panel(tmp_path):
    """Panels of comparable lengths (within 4x) share one time axis spanning the longest, so the
    shorter one is drawn to scale beside it, not stretched; the order of panels does not matter."""
    short, long = _one_event_timeline("F", 1.0, "short"), _one_event_timeline("B", 3.0, "long")
    assert _panel_limits([long, short], tmp_path) == [(0.0, 3.0), (0.0, 3.0)]
    assert _panel_limits([short, long], tmp_path) == [(0.0, 3.0), (0.0, 3.0)]


def test_plot_of_very_different_lengths_gives_each_panel_its_own_axis(tmp_path):
    """Past 4x a shared axis would squash the short timeline into a sliver: each panel then
    spans its own timeline."""
    short, long = _one_event_timeline("F", 1.0, "short"), _one_event_timeline("B", 5.0, "long")
    assert _panel_limits([long, short], tmp_path) == [(0.0, 5.0), (0.0, 1.0)]


def test_split_backwards_fit_as_whole_backwards():
    """A split backward's W seconds are added to its B (a whole backward, what the cost models
    price), and W / (B + W) is the measured weight-gradient share; unsplit records are as is."""
    from types import SimpleNamespace

    from megatron_terapipe.benchmark.fit import action_points, weight_grad_share

    def record(kind, t, start, end):
        return SimpleNamespace(kind=kind, microbatch=0, token_slice=t, chunk=0, start=start,
                               end=end)

    split = [record("B", 1, 0.0, 3.0), record("W", 1, 3.0, 4.0), record("B", 0, 4.0, 6.0)]
    assert action_points((8, 8), split, "B") == [(8, 8, 4.0), (8, 0, 2.0)]
    assert action_points((8, 8), split, "W") == [(8, 8, 1.0)]
    assert weight_grad_share([[split]]) == 0.25  # only slice 1 was split: 1 / (3 + 1)
    assert weight_grad_share([[split[:1] + split[2:]]]) is None
