"""bench_step's summary: ratios, verdicts and the goal against the same-kernel stock row."""

import importlib.util
import os

from megatron_terapipe.benchmark.compare import verdict
from megatron_terapipe.benchmark.table import format_summary as table_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_step():
    spec = importlib.util.spec_from_file_location(
        "bench_step", os.path.join(ROOT, "scripts", "bench_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name, kind, times, attention="sdpa", baseline_times=None, baseline=False, s=1):
    median = sorted(times)[(len(times) - 1) // 2]
    base = sorted(baseline_times or times)[(len(baseline_times or times) - 1) // 2]
    return {
        "schedule": name, "kind": kind, "attention": attention,
        "attention_kernel": attention + " kernel", "baseline": baseline,
        "num_token_slices": s, "step_time": median, "step_time_min": min(times),
        "step_time_max": max(times), "step_times": times, "speedup": base / median,
        "verdict": "baseline" if baseline else verdict(times, baseline_times or times),
        "bubble_measured": [0.5, 0.5], "compute_s": [1.0, 1.0], "comm_wait_s": [0.0, 0.0],
        "idle_s": [1.0, 1.0], "inflation": [1.0, 1.0], "peak_activation_mib": [1.0, 1.0],
        "max_loss_diff": 0.0,
    }


BASE = [2.0, 2.1, 1.9]


def _rows(token_times):
    return [
        _row("stock 1F1B, local attention", "stock-1f1b", [6.0, 6.1, 5.9], "local", BASE),
        _row("token-1f1b S=8", "token", token_times, baseline_times=BASE, s=8),
        _row("stock 1F1B", "stock-1f1b", BASE, baseline=True),
    ]


def test_verdict_needs_separated_ranges():
    assert verdict([1.0, 1.2], [1.3, 1.5]) == "faster"
    assert verdict([1.6, 1.7], [1.3, 1.5]) == "slower"
    assert verdict([1.0, 1.35], [1.3, 1.5]) == "tie"


def test_summary_puts_the_baseline_first_and_judges_the_goal_against_it():
    bench = _bench_step()
    summary = bench.summarise(_rows([1.1, 1.2, 1.15]), 1)
    assert summary["rows"][0]["schedule"] == "stock 1F1B"
    assert summary["best"] == "token-1f1b S=8"
    assert abs(summary["best_speedup"] - 2.0 / 1.15) < 1e-12
    assert summary["best_verdict"] == "faster" and summary["target_met"]  # 1.74x >= 1.65x
    # The local-spec row is a kernel difference, never the best or the baseline.
    assert summary["kernel_difference"] == {"stock 1F1B, local attention": 3.0}
    text = bench.format_summary({**summary, "config": {"notes": []}})
    assert "kernel difference (not a schedule gain)" in text and "goal >= 1.65x: met" in text


def test_a_gain_within_the_spread_does_not_meet_the_goal():
    bench = _bench_step()
    summary = bench.summarise(_rows([1.15, 1.95, 1.2]), 1)  # median 1.2: 1.75x, but overlaps
    assert summary["best_verdict"] == "tie" and summary["target_met"] is False
    text = bench.format_summary({**summary, "config": {"notes": []}})
    assert "a tie" in text and "NOT met" in text


def test_comparison_summary_says_where_the_token_pipeline_loses():
    rows = _rows([2.5, 2.6, 2.4])
    text = table_summary(rows)
    assert "SLOWER" in text and "slower than the baseline: token-1f1b S=8" in text
    assert "kernel difference, not a schedule gain: stock 1F1B, local attention" in text
