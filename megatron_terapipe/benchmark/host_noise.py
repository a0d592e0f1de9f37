"""Whether a run's rounds are steady enough to judge a goal by.

The benchmarks' goals sit a few per cent from what the token pipeline measures, so on a noisy
host a goal is neither met nor missed by what was measured, and the scripts say so instead of
printing a verdict. Host noise on a shared machine comes as spikes (another job takes the core
for one round) more than as a uniform spread, and a gauge on (max - min) / median is captured by
a single spiked round. So rounds far from the median (`OUTLIER_MADS` robust standard deviations,
estimated from the median absolute deviation, which spikes do not move) are set aside and named;
the host is quiet when at most a third of the rounds were set aside and the rest spread less
than `QUIET_SPREAD` of their median. Every variant's rounds are interleaved (the harness and the
single-stage timer rotate the order each round), so a spike hits one round of one variant, and
the reported medians already ignore it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

QUIET_SPREAD = 0.05  # (max - min) / median of the kept rounds
OUTLIER_MADS = 3.0  # a round this many robust standard deviations from the median is set aside
OUTLIER_FLOOR = QUIET_SPREAD / 2  # ... and only if it is also this far (relative) from it
MAX_OUTLIER_SHARE = 1 / 3  # more rounds set aside than this: the host is noisy, not spiking
MIN_ROUNDS_TO_SET_ASIDE = 4  # fewer rounds: too few to tell a spike from the spread
_MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution is 0.6745 sigma


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
            f"(goals are judged only below {100 * QUIET_SPREAD:.0f} %"
            + (f"; spiked rounds set aside, {set_aside}" if set_aside else "") + ")")
