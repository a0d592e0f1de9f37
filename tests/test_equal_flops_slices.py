"""Seq1F1B's computation-wise split (`equal_flops_slices`): exact against exhaustive search.

The FLOPs in the brute force come from `AnalyticCostModel.forward_flops` itself, not from the
strategy's own arithmetic, so a strategy equalising any other count fails here.
"""

import itertools

import pytest

from megatron_terapipe.slicing.cost_models import AnalyticCostModel
from megatron_terapipe.slicing.strategies import (
    attention_to_linear_ratio,
    equal_flops_slices,
    slice_flops,
)


def _model(hidden, heads, ffn=None):
    return AnalyticCostModel(num_layers=2, hidden_size=hidden, num_attention_heads=heads,
                             ffn_hidden_size=ffn)


def _forward_flops(model, token_slices, cache=None):
    cache = {} if cache is None else cache
    out, context = [], 0
    for length in token_slices:
        if (length, context) not in cache:
            cache[length, context] = float(model.forward_flops(1, length, context))
        out.append(cache[length, context])
        context += length
    return out


def _best_by_search(model, seq_length, num_slices, granularity):
    """Every split into multiples of the granularity: least largest slice, then greatest
    smallest slice, then longest slices first (the strategy's definition of most equal)."""
    units = seq_length // granularity
    scored, cache = [], {}
    for cuts in itertools.combinations(range(1, units), num_slices - 1):
        bounds = (0, *cuts, units)
        split = tuple((b - a) * granularity for a, b in zip(bounds, bounds[1:]))
        flops = _forward_flops(model, split, cache)
        scored.append((max(flops), min(flops), split))
    tol = 1e-9 * min(s[0] for s in scored)  # the two FLOP counts round differently
    top = min(s[0] for s in scored)
    scored = [s for s in scored if s[0] <= top + tol]
    floor = max(s[1] for s in scored)
    return max(s[2] for s in scored if s[1] >= floor - tol), top, floor


CASES = [
    # hidden, heads, ffn, seq, granularity: attention from dominant (ffn 1) to minor (h 256)
    (2, 1, None, 12, 1),
    (4, 1, None, 16, 1),
    (16, 2, None, 14, 1),
    (8, 2, 1, 15, 1),
    (64, 4, None, 24, 2),
    (32, 4, 8, 32, 4),
    (256, 8, None, 18, 1),
]


@pytest.mark.parametrize("hidden,heads,ffn,seq,granularity", CASES)
def test_matches_exhaustive_search_for_every_slice_count(hidden, heads, ffn, seq, granularity):
    model = _model(hidden, heads, ffn)
    ratio = attention_to_linear_ratio(model)
    for n in range(1, seq // granularity + 1):
        got = equal_flops_slices(seq, n, granularity, ratio)
        want, top, floor = _best_by_search(model, seq, n, granularity)
        assert got == want, (n, got, want)
        flops = _forward_flops(model, got)
        assert max(flops) == pytest.approx(top, rel=1e-9)
        assert min(flops) == pytest.approx(floor, rel=1e-9)
        assert sum(got) == seq and all(x > 0 and x % granularity == 0 for x in got)
        assert list(got) == sorted(got, reverse=True), got


def test_slice_flops_is_the_analytic_models_count():
    """The equalised quantity is forward_flops over 2·params per layer, for any model dims."""
    for hidden, heads, ffn in ((8, 2, 1), (64, 4, None), (96, 8, 200)):
        model = _model(hidden, heads, ffn)
        slices = (7, 5, 3, 1)
        want = [f / (2.0 * model.params_per_layer) for f in _forward_flops(model, slices)]
        assert slice_flops(slices, attention_to_linear_ratio(model)) == pytest.approx(want)


def test_hand_counted_splits():
    # ρ = 1/2, 10 tokens, 2 slices: (6, 4) costs 6·(1 + 6/2) = 24 and 4·(1 + 10/2) = 24;
    # equal lengths (5, 5) cost 17.5 and 30, (7, 3) 31.5 and 18.
    assert equal_flops_slices(10, 2, 1, 0.5) == (6, 4)
    # ρ = 1, 7 tokens, 3 slices: (3, 2, 2) costs 12, 12, 16 and (2, 3, 2) 6, 15, 16: the same
    # largest slice, so the greater smallest one decides; every other split has a slice > 16.
    assert equal_flops_slices(7, 3, 1, 1.0) == (3, 2, 2)
    # Without attention it is equal lengths, the remainder first (the `equal` strategy's rule).
    assert equal_flops_slices(10, 3, 1, 0.0) == (4, 3, 3)
    assert equal_flops_slices(64, 4, 16, 0.0) == (16,) * 4


def test_a_band_above_the_best_smallest_slice_holds_no_split():
    """The band search is exact only if a band too narrow says so instead of settling."""
    from megatron_terapipe.slicing.strategies import _SliceFlops

    flops = _SliceFlops(7, 1, 1.0)  # 7 tokens, ρ = 1, 3 slices: (3, 2, 2) costs 12, 12, 16
    top = flops.smallest_max(3)
    assert top == 16.0
    assert flops._best_in_band(3, top, 12.5) is None
    assert flops._best_in_band(3, top, 12.0) == flops._best_in_band(3, top, 0.0) == (3, 2, 2)


def test_later_slices_shrink_on_a_long_sequence():
    model = _model(1024, 16)
    slices = equal_flops_slices(8192, 8, 64, attention_to_linear_ratio(model))
    assert sum(slices) == 8192 and all(x % 64 == 0 for x in slices)
    assert slices[0] > slices[-1] and list(slices) == sorted(slices, reverse=True)


@pytest.mark.parametrize("ratio", [-0.1, float("nan"), float("inf")])
def test_bad_ratio_is_named(ratio):
    with pytest.raises(ValueError, match="attention_to_linear must be a finite number >= 0"):
        equal_flops_slices(16, 2, 1, ratio)


def test_bad_counts_get_the_equal_strategys_errors():
    with pytest.raises(ValueError, match="at most 4 slices"):
        equal_flops_slices(16, 5, 4, 0.1)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        equal_flops_slices(16, 2, 3, 0.1)


# -- the benchmarks' peer rows ------------------------------------------------------------------
def _bench_step():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "bench_step.py")
    spec = importlib.util.spec_from_file_location("bench_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_sets_each_equal_flops_row_beside_the_equal_row_of_its_s():
    bench = _bench_step()
    args = bench.parse_args(["--num-layers", "2", "--hidden-size", "32",
                             "--num-attention-heads", "4", "--seq-length", "64",
                             "--microbatch-counts", "1", "--num-token-slices", "2,4",
                             "--equal-flops-slices", "4,3", "--schedules", "token-1f1b",
                             "--split-backward", "both"])
    names = [v.name for v in bench.spec_for(args, 1).variants if v.kind == "token"]
    assert names[:8] == [
        "token-1f1b S=2", "token-1f1b S=2 split-B/W",
        "token-1f1b S=4", "token-1f1b S=4 split-B/W",
        "token-1f1b equal-flops S=4", "token-1f1b equal-flops S=4 split-B/W",
        "token-1f1b equal-flops S=3", "token-1f1b equal-flops S=3 split-B/W",
    ]
    peers = [v for v in bench.spec_for(args, 1).variants if v.strategy == "equal-flops"]
    model = AnalyticCostModel(num_layers=2, hidden_size=32, num_attention_heads=4)
    for v in peers:
        # Seq1F1B's split of these model dims on the planner's grid (64 tokens: 1-token units).
        want = equal_flops_slices(64, len(v.token_slices), 1, attention_to_linear_ratio(model))
        assert v.token_slices == want and v.token_slices[0] > v.token_slices[-1]
    with pytest.raises(SystemExit, match=r"--equal-flops-slices 65: valid counts are 1 to 64"):
        bench.spec_for(bench.parse_args(["--seq-length", "64", "--num-layers", "2",
                                         "--hidden-size", "32", "--num-attention-heads", "4",
                                         "--equal-flops-slices", "65"]), 1)


def _row(name, order, time, slices, strategy="", planned_by=None):
    return {"schedule": name, "order": order, "split_backward": False, "kind": "token",
            "num_token_slices": len(slices), "token_slices": list(slices), "step_time": time,
            "step_times": [time] * 5, "planned_by": planned_by, "slicing_strategy": strategy,
            "planner_predicted_step_time": None, "planner_error": None,
            "plan_cost_model": None, "plan_profile_seconds": None}


def test_auto_is_set_beside_seq1f1bs_split_of_its_own_s():
    bench = _bench_step()
    rows = [
        _row("token-1f1b S=4", "token-1f1b", 1.10, (16,) * 4),
        _row("token-1f1b equal-flops S=4", "token-1f1b", 0.80, (20, 16, 15, 13), "equal-flops"),
        _row("token-1f1b equal-flops S=2", "token-1f1b", 0.95, (36, 28), "equal-flops"),
        _row("terapipe equal-flops S=4", "terapipe", 0.70, (20, 16, 15, 13), "equal-flops"),
        _row("token-1f1b auto", "token-1f1b", 0.90, (24, 16, 12, 12), planned_by="auto"),
    ]
    (entry,) = bench.auto_summary(rows)
    # The peer row is never the "best equal-S" reference, however fast it is.
    assert entry["best_equal"] == "token-1f1b S=4"
    assert entry["equal_flops"] == "token-1f1b equal-flops S=4"
    assert entry["vs_equal_flops"] == pytest.approx(0.90 / 0.80 - 1)
    assert entry["vs_equal_flops_verdict"] == "slower"
    text = bench.format_auto(entry)
    assert "auto vs Seq1F1B's equal-flops split of the same S (token-1f1b equal-flops S=4" in text
    assert "+12.5 % (slower)" in text
    (alone,) = bench.auto_summary([rows[0], rows[4]])
    assert alone["equal_flops"] is None
    assert "--equal-flops-slices 4 adds one" in bench.format_auto(alone)


def test_compare_schedules_pairs_auto_with_the_equal_flops_row_of_its_s():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "compare_schedules.py")
    spec = importlib.util.spec_from_file_location("compare_schedules", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    rows = [
        _row("token-1f1b equal-flops S=2", "token-1f1b", 0.95, (36, 28), "equal-flops"),
        _row("token-1f1b equal-flops S=4", "token-1f1b", 0.80, (20, 16, 15, 13), "equal-flops"),
        _row("token-1f1b auto", "token-1f1b", 0.90, (24, 16, 12, 12), planned_by="auto"),
        _row("terapipe auto", "terapipe", 0.70, (32, 32), planned_by="auto"),
    ]
    paired, missing = compare.peer_lines(rows)
    assert paired.startswith("token-1f1b auto [24, 16, 12, 12]: 0.900 s vs Seq1F1B's "
                             "token-1f1b equal-flops S=4 [20, 16, 15, 13]: 0.800 s (+12.5 %")
    assert missing == ("terapipe auto (S=2): no equal-flops row of the same S "
                       "(--equal-flops-slices 2 adds one)")
