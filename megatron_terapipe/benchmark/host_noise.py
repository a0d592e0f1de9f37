"""Whether a run's rounds are steady enough to judge a goal by.

The benchmarks' goals sit a few per cent from what the token pipeline measures (1.65x against
1.59x, t_8/t_1 1.04 against 1.04-1.08). On a quiet host the same-kernel stock baseline's rounds
lie within 1-2 % of each other (1.7 % at M = 1, 1.3 % at M = 4 in `docs/bench_step.json`); on a
noisy one they spread 20-50 % (2026-12-01, the shared 2-core VM), and two runs ten minutes apart
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
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


def is_quiet(seconds: Sequence[float]) -> bool:
    """True when the rounds spread less than QUIET_SPREAD (a single round says nothing: False)."""
    return len(seconds) >= 2 and round_spread(seconds) < QUIET_SPREAD


def noise_note(seconds: Sequence[float], reference: str) -> str:
    """One line on how steady the reference's rounds were, for the printed tables."""
    if len(seconds) < 2:
        return f"host: one round of {reference} only, too few to tell whether the host is quiet"
    spread = 100 * round_spread(seconds)
    state = "quiet" if is_quiet(seconds) else "NOISY"
    return (f"host: {state}: {reference}'s rounds spread {spread:.1f} % of their median "
            f"(goals are judged only below {100 * QUIET_SPREAD:.0f} %)")
