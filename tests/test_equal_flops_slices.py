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
