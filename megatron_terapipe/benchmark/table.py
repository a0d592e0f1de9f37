"""Plain-text tables of comparison rows (what the scripts print)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.benchmark.host_noise import noise_note


def _per_stage(values: Sequence[float | None], fmt: str) -> str:
    return "/".join("-" if v is None or (isinstance(v, float) and math.isnan(v))
                    else format(v, fmt) for v in values)


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _spread(row: dict[str, Any]) -> str:
    times = row.get("step_times") or []
    if not times:
        return "-"
    return f"{min(times):.3f}-{max(times):.3f}"


def _speedup(row: dict[str, Any]) -> str:
    text = _num(row["speedup"], ".2f") + "x"
    if row.get("baseline"):
        return text + " (baseline)"
    if row.get("attention", "sdpa") != "sdpa":
        return text + " (kernel difference)"
    return text + (f" ({row['verdict']})" if row.get("verdict") else "")


COLUMNS = (
    ("schedule", lambda r: r["schedule"]),
    ("attention", lambda r: r.get("attention", "-")),
    ("S", lambda r: str(r["num_token_slices"])),
    ("step s", lambda r: _num(r["step_time"], ".3f")),
    ("min-max s", _spread),
    ("tokens/s", lambda r: _num(r["tokens_per_s"], ".0f")),
    ("vs same-kernel stock 1F1B", _speedup),
    ("bubble meas", lambda r: _per_stage(r["bubble_measured"], ".1%")),
    ("bubble sim", lambda r: _per_stage(r["bubble_simulated"], ".1%")),
    ("bubble replay", lambda r: _per_stage(r.get("bubble_replayed", []), ".1%")),
    ("peak act MiB", lambda r: _per_stage(r["peak_activation_mib"], ".0f")),
    ("sim step s", lambda r: _num(r["predicted_step_time"], ".3f")),
    ("planner pred s", lambda r: _num(r.get("planner_predicted_step_time"), ".3f")),
    ("planner err", lambda r: _num(100 * r["planner_error"], "+.1f") + "%"
     if r.get("planner_error") is not None else "-"),
    ("sim err", lambda r: _num(100 * r["prediction_error"], "+.1f") + "%"),
    ("max |dloss|", lambda r: _num(r["max_loss_diff"], ".1e")),
)

BREAKDOWN_COLUMNS = (
    ("schedule", lambda r: r["schedule"]),
    ("compute s", lambda r: _per_stage(r.get("compute_s", []), ".3f")),
    ("comm wait s", lambda r: _per_stage(r.get("comm_wait_s", []), ".3f")),
    ("idle s", lambda r: _per_stage(r.get("idle_s", []), ".3f")),
    ("t_S/t_1", lambda r: _per_stage(r.get("inflation", []), ".3f")),
)


def format_rows(rows: Sequence[dict[str, Any]], columns=COLUMNS) -> str:
    """Fixed-width table, one line per row; per-stage values are 'stage0/stage1/...'."""
    header = [name for name, _ in columns]
    body = [[fn(row) for _, fn in columns] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The closing lines: best token variant with its spread against the baseline, where the
    token pipeline loses, and the kernel difference on its own line."""
    baseline = next((r for r in rows if r.get("baseline")), None)
    if baseline is None:
        return "no same-kernel stock 1F1B row: no speedup to report"
    lines = [f"baseline: {baseline['schedule']} ({baseline['attention_kernel']}), "
             f"{baseline['step_time']:.3f} s (rounds {_spread(baseline)})",
             noise_note({"the baseline": baseline.get("step_times") or []})]
    token = [r for r in rows if r["kind"] == "token"]
    if token:
        best = min(token, key=lambda r: r["step_time"])
        lines.append(
            f"best token variant: {best['schedule']}: {best['step_time']:.3f} s (rounds "
            f"{_spread(best)}), {best['speedup']:.2f}x the baseline: "
            + {"faster": "faster", "slower": "SLOWER",
               "tie": "a tie (the per-round speedup interval holds 1, or the host is too noisy)"}
            .get(best["verdict"], best["verdict"]))
        losing = [r["schedule"] for r in token if r["verdict"] == "slower"]
        if losing:
            lines.append("slower than the baseline: " + ", ".join(losing))
    for r in rows:
        if r.get("attention", "sdpa") != baseline.get("attention", "sdpa"):
            lines.append(
                f"kernel difference, not a schedule gain: {r['schedule']} "
                f"({r['attention_kernel']}) takes {r['step_time']:.3f} s, "
                f"{r['step_time'] / baseline['step_time']:.2f}x the baseline's time")
    return "\n".join(lines)
