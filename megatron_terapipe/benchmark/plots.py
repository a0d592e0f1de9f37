"""PNG output of a comparison: a bar chart of step times, and per-schedule Gantt charts with the
measured step above the simulator's replay of it and its prediction from fitted costs (drawn by
`simulate.plot_timelines`, the same code the simulator CLI uses)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.simulate import plot_timelines


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def plot_bars(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Measured (median, with min-max whiskers) and simulated step time per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["schedule"] for r in rows]
    measured = [r["step_time"] for r in rows]
    lows = [r["step_time"] - min(r["step_times"]) for r in rows]
    highs = [max(r["step_times"]) - r["step_time"] for r in rows]
    simulated = [r["predicted_step_time"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    width = 0.38
    ax.bar([i - width / 2 for i in x], measured, width, yerr=[lows, highs], capsize=3,
           label="measured (median, min-max)", color="tab:blue")
    ax.bar([i + width / 2 for i in x], simulated, width, label="simulated (fitted costs)",
           color="tab:orange", alpha=0.8)
    for i, row in enumerate(rows):
        speedup = row["speedup"]
        if math.isfinite(speedup):
            # Ratios against same-kernel stock 1F1B; another kernel's row is labelled as such.
            note = ("\nbaseline" if row.get("baseline") else
                    "\nkernel diff." if row.get("attention", "sdpa") != "sdpa" else "")
            ax.text(i - width / 2, measured[i] + highs[i], f"{speedup:.2f}x{note}",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("step time (s); labels: vs same-kernel stock 1F1B")
    ax.set_title(title or "step time per schedule", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", linestyle=":", alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_comparison(comparison: Any, prefix: str, title: str = "") -> list[str]:
    """`prefix`_bars.png plus `prefix`_timeline_<schedule>.png per variant; returns the paths."""
    paths = [f"{prefix}_bars.png"]
    plot_bars(comparison.rows, paths[0], title)
    measured = comparison.measured_timelines()
    for name, timeline in measured.items():
        path = f"{prefix}_timeline_{slug(name)}.png"
        panels = [timeline]
        if name in comparison.replayed:
            panels.append(comparison.replayed[name].timeline)
        panels.append(comparison.simulated[name].timeline)
        plot_timelines(panels, path, title=f"{title}: {name}" if title else name)
        paths.append(path)
    return paths
