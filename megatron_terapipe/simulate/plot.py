"""Gantt charts of timelines (PNG via matplotlib's Agg backend).

matplotlib is imported inside the function only: the simulator, validator and CLI tables must work
without it, and a headless training node must never need a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_terapipe.simulate.timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_ROW_HEIGHT = 0.8
_MIN_LABEL_PX = 26.0  # narrower bars get no text: it would spill onto neighbours
_MAX_LEGEND_MICROBATCHES = 12


def _colour(microbatch: int, cmap) -> tuple:
    return cmap(microbatch % cmap.N)


def _share_x(timelines: Sequence[Timeline]) -> bool:
    """A shared axis compares timelines directly, but squashes one that is much shorter."""
    spans = [t.step_time() for t in timelines if t.step_time() > 0]
    units = {t.time_unit for t in timelines}
    return len(units) == 1 and bool(spans) and max(spans) <= 4 * min(spans)


def plot_timelines(timelines: Sequence[Timeline], path: str, title: str = "") -> Figure:
    """One Gantt subplot per timeline (stage 0 on top), coloured by micro-batch, saved to `path`.

    Forwards are light and hatched, backwards solid, communication waits thin grey bars; bars wide
    enough carry "m.t" (micro-batch.slice, plus "cV" for chunk V). Returns the figure (closed,
    its subplots first in `figure.axes`) so that callers and tests can read what was drawn, such
    as each panel's time axis, without decoding the PNG.
    """
    if not timelines:
        raise ValueError("plot_timelines needs at least one timeline")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    width_in = 14.0
    heights = [max(1.6, 0.45 * t.num_stages + 0.9) for t in timelines]
    fig, axes = plt.subplots(
        len(timelines),
        1,
        figsize=(width_in, sum(heights) + (0.6 if title else 0.2) + 0.9),
        gridspec_kw={"height_ratios": heights},
        sharex=_share_x(timelines),
        squeeze=False,
    )
    cmap = plt.get_cmap("tab20" if max(_num_microbatches(t) for t in timelines) > 10 else "tab10")
    shared_span = max(t.step_time() for t in timelines) if _share_x(timelines) else None
    for ax, timeline in zip(axes[:, 0], timelines):
        _draw(ax, timeline, cmap, width_in, shared_span)
    axes[-1, 0].set_xlabel(f"time ({timelines[0].time_unit})")

    max_mb = max(_num_microbatches(t) for t in timelines)
    handles = [
        Patch(facecolor=_colour(m, cmap), edgecolor="black", label=f"micro-batch {m}")
        for m in range(min(max_mb, _MAX_LEGEND_MICROBATCHES))
    ]
    if max_mb > _MAX_LEGEND_MICROBATCHES:
        handles.append(Patch(facecolor="white", edgecolor="white", label="... (colours repeat)"))
    handles += [
        Patch(facecolor="lightgrey", edgecolor="black", hatch="///", alpha=0.6, label="forward"),
        Patch(facecolor="dimgrey", edgecolor="black", label="backward"),
        Patch(facecolor="dimgrey", edgecolor="black", hatch="...", alpha=0.75,
              label="weight gradient (split)"),
        Patch(facecolor="black", alpha=0.35, label="comm / wait"),
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _num_microbatches(timeline: Timeline) -> int:
    return 1 + max((e.microbatch for e in timeline.events), default=0)


def _draw(ax, timeline: Timeline, cmap, width_in: float, shared_span: float | None) -> None:
    """One panel; with a shared time axis every panel spans the longest timeline."""
    origin = timeline.start_time
    span = max(timeline.step_time(), 1e-12)
    axis_span = max(shared_span or span, 1e-12)
    px_per_unit = width_in * 0.8 * 110 / axis_span  # plotting area is ~80% of the figure width
    for e in timeline.events:
        left, width = e.start - origin, e.end - e.start
        if width <= 0:
            continue
        if e.kind == "comm":
            ax.barh(e.stage + 0.3, width, left=left, height=0.12, color="black", alpha=0.35)
            continue
        colour = _colour(e.microbatch, cmap)
        forward = e.kind == "F"
        weight_grad = e.kind == "W"  # a split backward's weight gradient: dotted, paler
        ax.barh(
            e.stage,
            width,
            left=left,
            height=_ROW_HEIGHT * (0.8 if forward else 1.0),
            color=colour,
            alpha=0.55 if forward else (0.75 if weight_grad else 1.0),
            hatch="///" if forward else ("..." if weight_grad else None),
            edgecolor="black",
            linewidth=0.4,
        )
        if width * px_per_unit >= _MIN_LABEL_PX:
            text = f"{e.microbatch}.{e.token_slice}" + (f"c{e.chunk}" if e.chunk else "")
            ax.text(
                left + width / 2,
                e.stage,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="black" if forward else "white",
                fontweight="normal" if forward else "bold",
            )
    ax.set_yticks(range(timeline.num_stages))
    ax.set_yticklabels([f"stage {p}" for p in range(timeline.num_stages)])
    ax.set_ylim(timeline.num_stages - 0.5, -0.5)
    ax.set_xlim(0, axis_span)
    ax.grid(axis="x", linestyle=":", alpha=0.5)
    bubbles = timeline.bubble_fraction()
    mean = sum(bubbles) / len(bubbles) if bubbles else 0.0
    heading = timeline.label or "timeline"
    ax.set_title(
        f"{heading}  -  step {span:.4g} {timeline.time_unit}, mean bubble {mean:.1%}",
        fontsize=10,
        loc="left",
    )
