"""The quiet-host gauge's goal rule (host_noise.judge_ratio): the median of per-round ratios, its
order-statistic confidence interval, spikes set aside, a noisy host refused."""

import itertools
import random

import pytest

from megatron_terapipe.benchmark.host_noise import (
    CONFIDENCE,
    MAX_INTERVAL_WIDTH,
    judge_ratio,
    median_interval,
    paired_ratios,
)


def _brute_force_coverage(rounds: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)): every round lies above or below the true median with
    probability 1/2, independently; count the sign patterns with at least k on each side."""
    hits = sum(1 for signs in itertools.product((0, 1), repeat=rounds)
               if sum(signs) >= k and rounds - sum(signs) >= k)
    return hits / 2 ** rounds


@pytest.mark.parametrize("rounds", [3, 4, 5, 6, 8, 10, 12])
def test_interval_is_the_narrowest_with_the_stated_coverage(rounds):
    values = [1.0 + 0.01 * i for i in range(rounds)]
    random.Random(rounds).shuffle(values)
    interval = median_interval(values)
    ordered = sorted(values)
    k = ordered.index(interval.low) + 1
    assert interval.high == ordered[rounds - k]
    assert interval.confidence == pytest.approx(_brute_force_coverage(rounds, k))
    if _brute_force_coverage(rounds, 1) >= CONFIDENCE:
        assert interval.confidence >= CONFIDENCE
        # one order statistic further in would cover the median less often than CONFIDENCE
        assert k + 1 > (rounds + 1) // 2 or _brute_force_coverage(rounds, k + 1) < CONFIDENCE
    else:
        assert k == 1  # too few rounds: the full range, at its own lower coverage


def test_interval_covers_the_true_median_as_often_as_it_says():
    """Simulated hosts: 8 rounds of a skewed noise around a known median."""
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        values = [1.5 + rng.expovariate(20.0) - 0.0347 for _ in range(8)]  # median 1.5
        interval = median_interval(values)
        covered += interval.low <= 1.5 <= interval.high
    assert interval.confidence == pytest.approx(_brute_force_coverage(8, 2))
    assert covered / trials == pytest.approx(interval.confidence, abs=0.02)


def test_ratios_are_paired_round_by_round():
    assert paired_ratios([2.0, 4.0], [1.0, 2.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="as many rounds"):
        paired_ratios([2.0, 4.0], [1.0])


def test_a_goal_is_met_missed_or_not_decided_by_its_interval():
    base = [2.0, 2.02, 1.98, 2.01, 1.99, 2.0, 2.03, 1.97]
    fast = [b / 1.7 * (1 + 0.004 * (-1) ** i) for i, b in enumerate(base)]
    assert judge_ratio(base, fast, 1.65, at_least=True).met is True
    assert judge_ratio(base, fast, 1.75, at_least=True).met is False
    inside = judge_ratio(base, fast, 1.70, at_least=True)
    assert inside.met is None and not inside.host_noisy and "inside" in inside.reason
    # The other direction (a time ratio that must stay under its bound).
    assert judge_ratio(fast, base, 0.60, at_least=False).met is True
    assert judge_ratio(fast, base, 0.58, at_least=False).met is False


def test_one_spike_is_set_aside_but_a_noisy_host_is_not_judged():
    base = [2.0, 2.0, 2.6, 2.0, 2.0, 2.0, 2.0, 2.0]  # round 3 spiked
    token = [1.0, 1.01, 1.0, 0.99, 1.0, 1.01, 1.0, 0.99]
    judged = judge_ratio(base, token, 1.9, at_least=True)
    assert judged.met is True and judged.set_aside == 1 and judged.interval.rounds == 7
    rng = random.Random(1)
    noisy = [2.0 * (1 + rng.uniform(-0.2, 0.2)) for _ in base]
    judged = judge_ratio(noisy, token, 1.9, at_least=True)
    assert judged.met is None and judged.host_noisy
    assert judged.interval.width > MAX_INTERVAL_WIDTH and "noisy host" in judged.reason


def test_too_few_rounds_decide_nothing():
    judged = judge_ratio([2.0] * 4, [1.0] * 4, 1.5, at_least=True)
    assert judged.met is None and "too few" in judged.reason
    assert judge_ratio([2.0] * 5, [1.0] * 5, 1.5, at_least=True).met is True
