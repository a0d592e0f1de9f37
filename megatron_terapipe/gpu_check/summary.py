"""summary.json and summary.md from the steps' records."""

from __future__ import annotations

from typing import Any


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


def _step_c(r: dict) -> list[str]:
    lines = [f"{r.get('dtype')} · seq {r.get('seq_length')} · granularity "
             f"{r.get('granularity')} · clock {r.get('clock')} · P2P {r.get('p2p')} · "
             f"{r.get('note')}", ""]
    lines += _table(
        ["model", "TP", "t(full seq) ms", "t(first granule) ms", "t(last granule) ms"],
        [[m["model"], m["tensor_model_parallel"], m["t_full_sequence_ms"],
          m["t_one_granule_ms"], m["t_last_granule_ms"]] for m in r.get("layer_tables", [])])
    lines.append("")
    lines += _table(
        ["config", "B", "TP", "PP", "slices", "stock 1F1B s", "TeraPipe s",
         "predicted speedup (measured)", "analytic v100", "paper"],
        [[s["config"], s["batch_size_per_pipeline"], s["tensor_model_parallel"],
          s["pipeline_stages"], len(s["token_slices"]), s["stock_1f1b_step_s"],
          s["terapipe_step_s"], f"{s['predicted_speedup']:.2f}x",
          _fmt(s.get("analytic_v100_speedup"), ".2f"),
          f"{s['paper_headline']:.1f}x" if s.get("paper_headline") else "–"]
         for s in r.get("settings", [])])
    for s in r.get("skipped_settings", []):
        lines.append(f"- skipped {s['config']}: {s['reason']}")
    return lines


def _step_d(r: dict) -> list[str]:
    if "rows" in r:
        return [f"via {r['via']}", ""] + _table(
            ["S", "median s", "min(–max) s", "t_S / t_1", "peak memory GiB"],
            [[x["num_token_slices"], x["median_s"],
              f"{_fmt(x['min_s'], '.4g')}–{_fmt(x['max_s'], '.4g')}" if x.get("max_s")
              else _fmt(x["min_s"], ".4g"),
              x["t_S_over_t_1"], x["peak_memory_gib"]] for x in r["rows"]])
    return [f"via {r.get('via')}", "", "```", str(r.get("result", r.get("error")))[:3000], "```"]


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


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        f"# GPU check{' (dry run on CPU, toy sizes)' if summary['dry_run'] else ''}",
        "",
        f"device {env.get('device')} · torch {env.get('torch')} · CUDA {env.get('cuda')} · "
        f"Python {env.get('python')} · megatron-core {env.get('megatron_core')} · "
        f"{summary['elapsed_s']:.0f} s",
        "",
    ]
    deps = summary.get("dependencies", {})
    if deps.get("installed"):
        lines.append(f"installed from carried wheels: {', '.join(deps['installed'])}")
    for item in deps.get("missing", []):
        lines.append(f"- MISSING: {item}")
    lines += ["", "| step | result |", "|---|---|"]
    for r in summary["steps"]:
        lines.append(f"| {r['step']}. {r.get('title', '')} | {r.get('status')} |")
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
