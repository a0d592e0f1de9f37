"""Plain-text tables of comparison rows (what the scripts print)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _per_stage(values: Sequence[float | None], fmt: str) -> str:
    return "/".join("-" if v is None or (isinstance(v, float) and math.isnan(v))
                    else format(v, fmt) for v in values)


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


COLUMNS = (
    ("schedule", lambda r: r["schedule"]),
    ("S", lambda r: str(r["num_token_slices"])),
    ("step s", lambda r: _num(r["step_time"], ".3f")),
    ("tokens/s", lambda r: _num(r["tokens_per_s"], ".0f")),
    ("speedup", lambda r: _num(r["speedup"], ".2f") + "x"),
    ("bubble meas", lambda r: _per_stage(r["bubble_measured"], ".1%")),
    ("bubble sim", lambda r: _per_stage(r["bubble_simulated"], ".1%")),
    ("bubble replay", lambda r: _per_stage(r.get("bubble_replayed", []), ".1%")),
    ("peak act MiB", lambda r: _per_stage(r["peak_activation_mib"], ".0f")),
    ("sim step s", lambda r: _num(r["predicted_step_time"], ".3f")),
    ("sim err", lambda r: _num(100 * r["prediction_error"], "+.1f") + "%"),
    ("max |dloss|", lambda r: _num(r["max_loss_diff"], ".1e")),
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
