"""summary.json and summary.md from what a run left in its output folder.

`collect` reads run.jsonl (the orchestrator's journal: the dependency report and each step's
record, written as each step ends) and the measuring steps' row files (c.jsonl, d.jsonl,
written row by row), so it works on a finished run, on one whose steps were killed by the
budget and on one cut off as a whole; the rows that did not come back are listed with why.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_terapipe.gpu_check.common import read_rows

# A run's exit status is 1 when a step ends in one of these (a check failed, a step crashed,
# was killed by the budget, or returned only part of its rows).
BAD_STATUSES = ("fail", "error", "timeout", "partial", "cut off")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _criterion(x: dict) -> str:
    if "rtol" in x:
        return f"all <= {x['rtol']:g}"
    return (f"vs fp32: sliced {_fmt(x.get('sliced_vs_fp32_grad'))} <= "
            f"{x['error_ratio_bound']:g} x unsliced {_fmt(x.get('whole_vs_fp32_grad'))}")


def _step_a(r: dict) -> list[str]:
    rows = [[x["dtype"], x["mask"], x["backend"], x["status"], x.get("loss_rel_diff"),
             x.get("max_grad_rel_diff"), x.get("stock_loss_rel_diff"),
             x.get("stock_max_grad_rel_diff"), _criterion(x), x.get("reason", "")]
            for x in r.get("rows", [])]
    lines = _table(["dtype", "mask", "SDPA backend", "result", "loss rel. diff",
                    "max grad rel. diff", "vs stock: loss", "vs stock: grad",
                    "criterion", "note"], rows)
    if "sdpa_schema_mismatches" in r:
        changed = r["sdpa_schema_mismatches"]
        lines.append(f"private SDPA ops against torch {r.get('torch', '?')}: " + (
            "every schema as pinned in compat/sdpa_ops.py" if not changed
            else "changed: " + ", ".join(f"aten.{name}" for name in changed)))
    return lines


def _step_b(r: dict) -> list[str]:
    stock, token = r.get("stock", {}), r.get("token", {})
    if "losses" not in stock or "losses" not in token:
        return [f"stock: {stock.get('error', '')}; token: {token.get('error', '')}"]
    rows = [[i + 1, s, t, d] for i, (s, t, d) in enumerate(
        zip(stock["losses"], token["losses"], r.get("loss_rel_diffs", [])))]
    return _table(["step", "stock lm loss", "token-pipeline lm loss", "rel. diff"], rows) + [
        "", f"criterion: relative difference <= {r['loss_rtol']:g} (bf16, token vs stock schedule)"]


def _missing(r: dict) -> list[str]:
    lines = []
    for m in r.get("missing", []):
        lines.append(f"- MISSING {m.get('row')} ({m.get('got')} came back): {m.get('reason')}")
    return [""] + lines if lines else []


def _step_c(r: dict) -> list[str]:
    lines = [f"{r.get('dtype')} · seq {r.get('seq_length')} · granularity "
             f"{r.get('granularity')} · clock {r.get('clock')} · P2P {r.get('p2p')} · "
             f"{r.get('note')}", ""]
    lines += _table(
        ["model", "TP", "t(full seq) ms", "t(first granule) ms", "t(last granule) ms"],
        [[m["model"], m["tensor_model_parallel"], m["t_full_sequence_ms"],
          m["t_one_granule_ms"], m["t_last_granule_ms"]] for m in r.get("layer_tables", [])])
    lines += _missing(r)
    lines.append("")
    if not r.get("planned"):
        lines.append("DP plan and simulated speedup: not computed on the device; run "
                     "`python -m megatron_terapipe.gpu_check summarize DIR --out OUT` on the "
                     "returned files.")
        return lines
    planned = [s for s in r.get("settings", []) if "plan_error" not in s]
    lines += _table(
        ["config", "B", "TP", "PP", "slices", "stock 1F1B s", "TeraPipe s",
         "predicted speedup (measured)", "analytic v100", "paper"],
        [[s["config"], s["batch_size_per_pipeline"], s["tensor_model_parallel"],
          s["pipeline_stages"], len(s["token_slices"]), s["stock_1f1b_step_s"],
          s["terapipe_step_s"], f"{s['predicted_speedup']:.2f}x",
          _fmt(s.get("analytic_v100_speedup"), ".2f"),
          f"{s['paper_headline']:.1f}x" if s.get("paper_headline") else "–"]
         for s in planned])
    for s in r.get("settings", []):
        if "plan_error" in s:
            lines.append(f"- {s['config']}: planning failed: {s['plan_error']}")
    for s in r.get("skipped_settings", []):
        lines.append(f"- skipped {s['config']}: {s['reason']}")
    return lines


def _step_d(r: dict) -> list[str]:
    lines = [f"via {r.get('via', 'benchmark.single_stage (one process)')} · "
             f"{r.get('dtype')} · rounds {r.get('rounds')}", ""]
    lines += _table(
        ["S", "rounds", "median s", "min–max s", "t_S / t_1", "peak memory GiB"],
        [[x["num_token_slices"], x["rounds"], x["median_s"],
          f"{_fmt(x['min_s'], '.4g')}–{_fmt(x['max_s'], '.4g')}", x["t_S_over_t_1"],
          x["peak_memory_gib"]] for x in r.get("rows", [])])
    return lines + _missing(r)


def _step_e(r: dict) -> list[str]:
    if "loss_rel_diffs" in r:
        rows = [[i + 1, s, t, d] for i, (s, t, d) in enumerate(
            zip(r["stock"]["losses"], r["token"]["losses"], r["loss_rel_diffs"]))]
        return _table(["iteration", "stock lm loss", "token-pipeline lm loss", "rel. diff"],
                      rows) + ["", f"criterion: relative difference <= {r['loss_rtol']:g}"]
    if "parsed" in r:
        return [f"{r.get('mode')}: upstream parsed and validated the token flags: "
                f"{r['parsed']}"]
    return []


RENDER = {"a": _step_a, "b": _step_b, "c": _step_c, "d": _step_d, "e": _step_e}


def collect(out_dir: str, plan: bool, tables_out: str | None = None) -> dict[str, Any]:
    """The summary of the run in `out_dir`: step records from its journal, c and d assembled
    from their rows (with `plan`, c's DP plan and simulation: the CPU's part)."""
    from megatron_terapipe.gpu_check import inflation, latency

    events = read_rows(os.path.join(out_dir, "run.jsonl"))
    start = next((e for e in events if e.get("event") == "start"), {})
    end = next((e for e in events if e.get("event") == "end"), None)
    records = {e["step"]: {k: v for k, v in e.items() if k != "event"}
               for e in events if e.get("event") == "step"}
    planned = start.get("steps", "".join(sorted(records)))
    steps = []
    for key in sorted(set(planned) | set(records)):
        record = records.get(key)
        if key == "c" and (record is None or record.get("status") != "skipped"):
            steps.append(latency.assemble(read_rows(os.path.join(out_dir, "c.jsonl")), record,
                                          plan, tables_out))
        elif key == "d" and (record is None or record.get("status") != "skipped"):
            steps.append(inflation.assemble(read_rows(os.path.join(out_dir, "d.jsonl")),
                                            record))
        elif record is None:
            steps.append({"step": key, "status": "cut off", "reason": "the device call ended "
                          "before this step did (outer time limit)"})
        else:
            steps.append(record)
    environment = next((e for e in events if e.get("event") == "environment"), {})
    return {
        "dry_run": start.get("dry_run", False),
        "budget_s": start.get("budget_s"),
        "environment": {k: v for k, v in environment.items() if k != "event"},
        "dependencies": next((e for e in events if e.get("event") == "dependencies"), {}),
        "elapsed_s": end["elapsed_s"] if end else None,
        "complete": end is not None,
        "steps": steps,
    }


def write(result: dict[str, Any], out_dir: str) -> str:
    """summary.json and summary.md in `out_dir`; returns the markdown."""
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    text = markdown(result)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def exit_status(result: dict[str, Any]) -> int:
    return 1 if any(r.get("status") in BAD_STATUSES for r in result["steps"]) else 0


def markdown(summary: dict) -> str:
    env = summary.get("environment", {})
    elapsed = summary.get("elapsed_s")
    lines = [
        f"# GPU check{' (dry run on CPU, toy sizes)' if summary.get('dry_run') else ''}",
        "",
        f"device {env.get('device')} · torch {env.get('torch')} · CUDA {env.get('cuda')} · "
        f"Python {env.get('python')} · megatron-core {env.get('megatron_core')} · "
        + (f"{elapsed:.0f} s" if elapsed is not None else "cut off before its end")
        + (f" of a {summary['budget_s']:.0f} s budget" if summary.get("budget_s") else ""),
        "",
    ]
    deps = summary.get("dependencies", {})
    if deps.get("installed"):
        lines.append(f"installed from carried wheels: {', '.join(deps['installed'])}")
    for item in deps.get("missing", []):
        lines.append(f"- MISSING: {item}")
    lines += ["", "| step | result | window s | elapsed s |", "|---|---|---|---|"]
    for r in summary["steps"]:
        lines.append(f"| {r['step']}. {r.get('title', '')} | {r.get('status')} | "
                     f"{_fmt(r.get('window_s'))} | {_fmt(r.get('elapsed_s'))} |")
    for r in summary["steps"]:
        lines += ["", f"## {r['step']}. {r.get('title', '')}: {r.get('status')}", ""]
        if r.get("reason"):
            lines.append(f"reason: {r['reason']}")
        try:
            lines += RENDER[r["step"]](r)
        except (KeyError, TypeError, ValueError) as exc:
            lines.append(f"(record could not be rendered: {exc!r}; see summary.json)")
        if r.get("log_tail"):
            lines += ["", "```", *r["log_tail"], "```"]
    return "\n".join(lines) + "\n"
