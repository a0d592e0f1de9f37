"""Whether a run's rounds are steady enough to judge a goal by.

The benchmarks' goals sit a few per cent from what the token pipeline measures (1.65x against
1.59x, t_8/t_1 1.04 against 1.04-1.08). On a quiet host the same-kernel stock baseline's rounds
lie within 1-2 % of each other (1.7 % at M = 1, 1.3 % at M = 4 in `docs/bench_step.json`); on a
noisy one they spread 14-44 % (2026-12-01, the shared 2-core VM), and two runs 25 minutes apart
disagree by more than the distance to the goal. A goal is then neither met nor missed by what
was measured, and the scripts say so instead of printing a verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

QUIET_SPREAD = 0.05  # (max - min) / median of the reference's rounds on a quiet host: 1-2 %


def round_spread(seconds: Sequence[float]) -> float:
    """(max - min) / median of the rounds; 0 for fewer than two rounds."""
    if len(seconds) < 2:
        return 0.0
    median = statistics.median(seconds)
    return (max(seconds) - min(seconds)) / median if median > 0 else float("inf")


def is_quiet(seconds: Sequence[float]) -> bool:
    """True when the rounds spread less than QUIET_SPREAD (a single round says nothing: False)."""
    return len(seconds) >= 2 and round_spread(seconds) < QUIET_SPREAD


def undecided_reason(rounds: dict[str, Sequence[float]]) -> str | None:
    """Why a goal measured on these references' rounds cannot be judged, or None if it can."""
    for name, seconds in rounds.items():
        if len(seconds) < 2:
            return f"one round of {name}: too few to tell whether the host is quiet"
    for name, seconds in rounds.items():
        if not is_quiet(seconds):
            return f"noisy host: {name}'s rounds spread {100 * round_spread(seconds):.1f} %"
    return None


def noise_note(rounds: dict[str, Sequence[float]]) -> str:
    """One line on how steady the references' rounds were, for the printed tables."""
    if any(len(seconds) < 2 for seconds in rounds.values()):
        return f"host: {undecided_reason(rounds)}"
    spreads = ", ".join(f"{name}'s rounds {100 * round_spread(seconds):.1f} %"
                        for name, seconds in rounds.items())
    state = "quiet" if undecided_reason(rounds) is None else "NOISY"
    return (f"host: {state}: spread (max - min over the median) of {spreads} "
            f"(goals are judged only below {100 * QUIET_SPREAD:.0f} %)")
