"""The faster / slower / tie verdict against the baseline: the per-round speedup's interval,
judged without spiked rounds.

Six rounds each side, as bench_step and compare_schedules time them; the spike rule is
host_noise's (a ratio 3 robust standard deviations and 2.5 % from the median).
"""

import importlib.util
import os

from megatron_terapipe.benchmark.compare import judged_fields, verdict, verdict_detail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = [1.20, 1.21, 1.19, 1.20, 1.22, 1.18]
FAST = [1.00, 1.01, 0.99, 1.00, 1.02, 1.00]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_spiked_round_of_six_does_not_make_a_tie():
    spiked = FAST[:5] + [1.60]  # another job took the core for one round
    assert max(spiked) > min(BASE)  # the rounds' ranges overlap
    detail = verdict_detail(spiked, BASE)
    assert detail["verdict"] == "faster" and detail["set_aside"] == 1
    kept = sorted(b / f for b, f in zip(BASE[:5], FAST[:5]))
    assert detail["interval"] == [kept[0], kept[-1]]  # five rounds: the range covers 94 %
    # A spike on the baseline's side, and the slower direction.
    low_base = BASE[:5] + [0.95]
    assert min(low_base) < max(FAST) and verdict(FAST, low_base) == "faster"
    slow = [t + 0.4 for t in FAST[:5]] + [1.10]
    assert min(slow) < max(BASE) and verdict(slow, BASE) == "slower"


def test_speedups_whose_interval_holds_one_are_a_tie():
    row = [1.00, 1.05, 1.10, 1.02, 1.08, 1.04]
    base = [1.05, 1.03, 1.12, 1.01, 1.09, 1.06]
    detail = verdict_detail(row, base)
    assert detail["interval"][0] < 1.0 < detail["interval"][1]
    assert detail["verdict"] == "tie" and detail["set_aside"] == 0
    # Setting a spike aside still leaves a tie when the kept ratios straddle 1.
    assert verdict(row[:5] + [1.70], base) == "tie"


def test_a_steady_gain_is_faster_though_the_rounds_overlap():
    """The host drifts; both sides' ranges overlap, but every round's speedup is 1.1x."""
    drift = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    base = [1.1 * d for d in drift]
    assert max(drift) > min(base)
    assert verdict(drift, base) == "faster"
    assert verdict(drift[::-1], base) == "tie"  # unpaired: the same rounds are noise


def test_a_noisy_row_is_not_decided_by_its_quiet_half():
    # Half the rounds slow: the MAD is as wide as the spread, so nothing is set aside.
    half = [1.00, 1.00, 1.00, 1.45, 1.50, 1.55]
    assert verdict_detail(half, [1.30] * 6)["set_aside"] == 0
    assert verdict(half, [1.30] * 6) == "tie"
    # Three of seven rounds far out: more than a third is a noisy host, not a spike, so every
    # round is kept (setting them aside would call the four quiet rounds "faster").
    noisy = [1.00, 1.00, 1.00, 1.00, 1.50, 1.60, 1.70]
    assert verdict_detail(noisy, [1.30] * 7)["set_aside"] == 0
    assert verdict(noisy, [1.30] * 7) == "tie"


def test_too_few_rounds_give_no_verdict():
    # Under five rounds no interval covers the median 90 % of the time: a tie, however far
    # apart (four rounds: 88 %, five: 94 %).
    assert verdict([1.0] * 4, [1.3] * 4) == "tie"
    assert verdict([1.0] * 5, [1.3] * 5) == "faster"
    assert verdict_detail([1.0, 1.2], [1.3, 1.5])["confidence"] == 0.5
    assert verdict([], [1.0]) == ""


def test_rounds_that_are_not_times_are_not_judged():
    assert verdict([1.0, float("nan"), 1.0, 1.0, 1.0], [1.3] * 5).startswith(
        "not judged: round times must be finite and > 0")
    assert verdict([1.0, 0.0, 1.0, 1.0, 1.0], [1.3] * 5).startswith("not judged")
    assert "as many rounds" in verdict([1.0] * 5, [1.3] * 4)


def _bench_row(name, times, baseline=False):
    median = sorted(times)[(len(times) - 1) // 2]
    return {"schedule": name, "kind": "stock-1f1b" if baseline else "token",
            "attention": "sdpa", "attention_kernel": "sdpa kernel", "baseline": baseline,
            "order": "" if baseline else "token-1f1b", "split_backward": False,
            "num_token_slices": 1 if baseline else 4, "token_slices": [], "step_time": median,
            "step_time_min": min(times), "step_time_max": max(times), "step_times": times,
            **judged_fields(times, BASE, baseline), "planned_by": None}


def test_bench_step_prints_the_interval_and_what_was_set_aside():
    bench = _script("bench_step")
    rows = [_bench_row("stock 1F1B", BASE, baseline=True),
            _bench_row("token-1f1b S=4", FAST[:5] + [1.60])]
    summary = bench.summarise(rows, 4)
    assert summary["best_verdict"] == "faster" and summary["best_rounds_set_aside"] == 1
    text = bench.format_summary({**summary, "config": {"notes": []}})
    assert "1.20-1.20x (1 of 6 set aside)" in text  # 1.196-1.202x
    assert "per-round speedup interval 1.20-1.20x, 1 spiked round(s) set aside" in text


def test_compare_schedules_names_the_rows_with_rounds_set_aside():
    compare = _script("compare_schedules")
    rows = [_bench_row("stock 1F1B", BASE, baseline=True),
            _bench_row("token-1f1b S=4", FAST[:5] + [1.60]),
            _bench_row("token-1f1b S=8", FAST)]
    (line,) = compare.set_aside_lines(rows)
    assert "token-1f1b S=4 1 of 6" in line and "S=8" not in line
    assert compare.set_aside_lines(rows[::2]) == []


def test_no_verdict_on_a_noisy_host():
    """Every round faster, but the per-round speedups spread 35 %: the host is too noisy to
    judge a goal on, and a verdict drawn there would be the load's, not the schedule's."""
    noisy_base = [2.0, 2.6, 1.9, 2.4, 2.1, 2.7]
    assert min(noisy_base) > 1.05
    assert verdict([1.0, 1.0, 1.0, 1.0, 1.05, 1.0], noisy_base) == "tie"
    assert verdict([1.0, 1.0, 1.0, 1.0, 1.05, 1.0], [2.0, 2.02, 1.98, 2.0, 2.1, 2.01]) == "faster"
