"""Whether a run's rounds are steady enough to judge a goal by, and what the goal's ratio is.

The benchmarks' goals sit a few per cent from what the token pipeline measures, so on a noisy
host a goal is neither met nor missed by what was measured, and the scripts say so instead of
printing a verdict. Two rules serve two questions:

- A goal is a ratio of two variants (stock over token, t_8 over t_1). Every variant's rounds
  are interleaved (the harness and the single-stage timer rotate the order each round), so
  round i of both sides ran under the same host load: the ratio is taken per round, which
  cancels the slow drift of a shared machine that separate spreads would add up. The goal is
  judged on the median of those paired ratios with its distribution-free confidence interval
  (order statistics, `CONFIDENCE`): met when the whole interval is on the goal's side, NOT met
  when it is on the other side, not decided when the bound is inside it. A spiked round is
  one paired ratio at an end of the order, outside the interval. The host is too noisy to
  judge at all when the interval is wider than `MAX_INTERVAL_WIDTH` of the median.
- The printed note on a reference's own rounds (`noise_note`): rounds far from the median
  (`OUTLIER_MADS` robust standard deviations, from the median absolute deviation, which spikes
  do not move) are set aside and named; the rest spread less than `QUIET_SPREAD`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

QUIET_SPREAD = 0.05  # (max - min) / median of the kept rounds
OUTLIER_MADS = 3.0  # a round this many robust standard deviations from the median is set aside
OUTLIER_FLOOR = QUIET_SPREAD / 2  # ... and only if it is also this far (relative) from it
MAX_OUTLIER_SHARE = 1 / 3  # more rounds set aside than this: the host is noisy, not spiking
MIN_ROUNDS_TO_SET_ASIDE = 4  # fewer rounds: too few to tell a spike from the spread
_MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma
CONFIDENCE = 0.90  # coverage of the median's interval a goal is judged on
MAX_INTERVAL_WIDTH = 0.10  # (high - low) / median of that interval: wider, the host is noisy


def outliers(seconds: Sequence[float]) -> list[int]:
    """Indices of the rounds set aside: farther from the median than both OUTLIER_MADS robust
    standard deviations and OUTLIER_FLOOR of the median (none of fewer than
    MIN_ROUNDS_TO_SET_ASIDE rounds)."""
    if len(seconds) < MIN_ROUNDS_TO_SET_ASIDE:
        return []
    median = statistics.median(seconds)
    sigma = _MAD_TO_SIGMA * statistics.median(abs(x - median) for x in seconds)
    limit = max(OUTLIER_MADS * sigma, OUTLIER_FLOOR * median)
    return [i for i, x in enumerate(seconds) if abs(x - median) > limit]


def kept_rounds(seconds: Sequence[float]) -> list[float]:
    """The rounds without the outliers."""
    dropped = set(outliers(seconds))
    return [x for i, x in enumerate(seconds) if i not in dropped]


def round_spread(seconds: Sequence[float]) -> float:
    """(max - min) / median of the kept rounds; 0 for fewer than two rounds."""
    kept = kept_rounds(seconds)
    if len(kept) < 2:
        return 0.0
    median = statistics.median(kept)
    return (max(kept) - min(kept)) / median if median > 0 else float("inf")


def _too_many_outliers(seconds: Sequence[float]) -> bool:
    return len(outliers(seconds)) > MAX_OUTLIER_SHARE * len(seconds)


def is_quiet(seconds: Sequence[float]) -> bool:
    """True when few rounds spiked and the rest spread less than QUIET_SPREAD (a single round
    says nothing: False)."""
    return (len(seconds) >= 2 and not _too_many_outliers(seconds)
            and round_spread(seconds) < QUIET_SPREAD)


def _outlier_text(name: str, seconds: Sequence[float]) -> str:
    median = statistics.median(seconds)
    shown = ", ".join(f"round {i + 1} {100 * (seconds[i] / median - 1):+.0f} %"
                      for i in outliers(seconds))
    return f"{name}: {len(outliers(seconds))} of {len(seconds)} rounds set aside ({shown})"


def undecided_reason(rounds: dict[str, Sequence[float]]) -> str | None:
    """Why a goal measured on these references' rounds cannot be judged, or None if it can."""
    for name, seconds in rounds.items():
        if len(seconds) < 2:
            return f"one round of {name}: too few to tell whether the host is quiet"
    for name, seconds in rounds.items():
        if _too_many_outliers(seconds):
            return f"noisy host: {_outlier_text(name, seconds)}, more than a third"
        if not is_quiet(seconds):
            return f"noisy host: {name}'s rounds spread {100 * round_spread(seconds):.1f} %"
    return None


def noise_note(rounds: dict[str, Sequence[float]]) -> str:
    """One line on how steady the references' rounds were, for the printed tables."""
    if any(len(seconds) < 2 for seconds in rounds.values()):
        return f"host: {undecided_reason(rounds)}"
    spreads = ", ".join(f"{name}'s rounds {100 * round_spread(seconds):.1f} %"
                        for name, seconds in rounds.items())
    set_aside = "; ".join(_outlier_text(name, seconds) for name, seconds in rounds.items()
                          if outliers(seconds))
    state = "quiet" if undecided_reason(rounds) is None else "NOISY"
    return (f"host: {state}: spread (max - min over the median) of {spreads} "
            f"(quiet below {100 * QUIET_SPREAD:.0f} %; a description of the rounds, goals are "
            "judged on the per-round ratio's interval"
            + (f"; spiked rounds set aside, {set_aside}" if set_aside else "") + ")")


@dataclass(frozen=True)
class RatioInterval:
    """The median of per-round ratios and its order-statistic confidence interval."""

    median: float
    low: float
    high: float
    rounds: int
    confidence: float  # the interval's exact coverage for the median (binomial, p = 1/2)

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.median if self.median > 0 else math.inf


@dataclass(frozen=True)
class Judgement:
    """A goal's ratio, its interval, and met (True / False; None: not decided, and why)."""

    met: bool | None
    interval: RatioInterval | None
    reason: str | None = None
    set_aside: int = 0  # spiked rounds (outlying paired ratios) left out of the interval
    host_noisy: bool = False  # not decided because the rounds were too noisy to judge
    enough_rounds: bool = True  # False: too few rounds to say whether the host was quiet

    def to_dict(self) -> dict:
        iv = self.interval
        return {"met": self.met, "reason": self.reason,
                "ratio": iv.median if iv else None,
                "interval": [iv.low, iv.high] if iv else None,
                "confidence": iv.confidence if iv else None,
                "rounds": iv.rounds if iv else 0, "set_aside": self.set_aside,
                "host_noisy": self.host_noisy, "enough_rounds": self.enough_rounds}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """numerator[i] / denominator[i]: the two sides' rounds were timed in the same rotation.
    ValueError for rounds that cannot be paired or are not a time (not finite and > 0)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired ratios need as many rounds on both sides, got "
                         f"{len(numerator)} and {len(denominator)}")
    bad = [x for x in (*numerator, *denominator) if not (math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"round times must be finite and > 0, got {bad[0]!r}")
    return [a / b for a, b in zip(numerator, denominator)]


def _coverage(rounds: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n i.i.d. rounds: 1 - 2 P(Binomial(n, 1/2) < k)."""
    below = sum(math.comb(rounds, i) for i in range(k)) / 2.0 ** rounds
    return 1.0 - 2.0 * below


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE
                    ) -> RatioInterval | None:
    """The median with the narrowest order-statistic interval covering it with at least
    `confidence`; with too few rounds for that, their full range and its lower coverage
    (None for no rounds). The coverage is that of i.i.d. rounds; of rounds left after spikes
    were set aside it is nominal."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    k = 1
    while k + 1 <= (n + 1) // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
    return RatioInterval(statistics.median(ordered), ordered[k - 1], ordered[n - k], n,
                         _coverage(n, k))


def _min_rounds(confidence: float) -> int:
    return next(n for n in range(1, 64) if _coverage(n, 1) >= confidence)


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float]
                   ) -> tuple[RatioInterval | None, int, str | None]:
    """The paired ratios' median interval without the spiked rounds, how many were set aside,
    and why the host is too noisy to judge (None: it is not). A spike on either side is one
    ratio far from the others (`outliers`); more than MAX_OUTLIER_SHARE of them is a noisy
    host, not a spike, and nothing is set aside."""
    ratios = paired_ratios(numerator, denominator)
    dropped = outliers(ratios)
    if len(dropped) > MAX_OUTLIER_SHARE * len(ratios):
        interval = median_interval(ratios)
        return interval, 0, (f"noisy host: {len(dropped)} of {len(ratios)} rounds' ratios far "
                             "from their median, more than a third")
    interval = median_interval(kept_rounds(ratios))
    if interval is not None and interval.width > MAX_INTERVAL_WIDTH:
        return interval, len(dropped), (
            f"noisy host: the ratio's {100 * interval.confidence:.0f} % interval spans "
            f"{100 * interval.width:.1f} % of its median (judged below "
            f"{100 * MAX_INTERVAL_WIDTH:.0f} %)")
    return interval, len(dropped), None


def judge_ratio(numerator: Sequence[float], denominator: Sequence[float], bound: float,
                at_least: bool) -> Judgement:
    """Is median(numerator_i / denominator_i) >= bound (`at_least`) or <= bound, by the ratio's
    confidence interval (`ratio_interval`); not decided when the bound is inside it, the rounds
    are too few for CONFIDENCE, or the host is noisy."""
    interval, aside, noisy = ratio_interval(numerator, denominator)
    if interval is None or interval.confidence < CONFIDENCE:
        return Judgement(None, interval, f"{len(numerator)} rounds: too few for a "
                         f"{100 * CONFIDENCE:.0f} % interval (at least "
                         f"{_min_rounds(CONFIDENCE) + aside} here)", aside, enough_rounds=False)
    if noisy:
        return Judgement(None, interval, noisy, aside, host_noisy=True)
    good, bad = ((interval.low >= bound, interval.high < bound) if at_least
                 else (interval.high <= bound, interval.low > bound))
    if good or bad:
        return Judgement(good, interval, None, aside)
    return Judgement(None, interval, f"the bound {bound:g} is inside the ratio's "
                     f"{100 * interval.confidence:.0f} % interval "
                     f"{interval.low:.3f}-{interval.high:.3f}", aside)
