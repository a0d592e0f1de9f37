"""Step c: measured per-slice cost at paper shapes, and the paper-scale prediction from it.

For each (model, tensor-parallel size) of configs/terapipe/*.args at sequence 2048: the
forward+backward seconds t(l, c) of ONE transformer layer with the per-rank shapes of that TP
size (heads/t, ffn/t: the matmuls one rank runs; the TP all-reduces are not in it, one GPU has
no TP group), bf16, for every slice length l and context c on a grid of `granularity` tokens,
with the prefix keys/values in place as in a real step (slicing.profiler's measure function).
The device process only measures: it appends one JSON line per measured cell to its rows file
(`--rows`, c.jsonl in the output folder) as it goes, so a step killed by the budget returns
every cell it finished. On the CPU afterwards (`python -m megatron_terapipe.gpu_check summarize
DIR`), `assemble` turns complete tables into the planner's latency tables
(docs/latency_table.md, one layer per file), names the incomplete ones, and per setting
computes the stage table (layer table x layers per stage), P2P from the analytic
h100 preset, TeraPipe's DP plan (slicing.planner) and the simulated step time of stock 1F1B
(whole sequences) vs the planned TeraPipe schedule (simulate), as benchmark/paper.py does
with assumed costs; the analytic v100 prediction and the paper's 5.0x (175B) sit beside it.
"""

from __future__ import annotations

import glob
import math
import os
import tarfile
from typing import Any

from megatron_terapipe.gpu_check.common import step_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_GLOB = os.path.join(REPO, "configs", "terapipe", "*.args")
PAPER_HEADLINE = {"gpt3-175b": 5.0}
P2P_PRESET = "h100"


def paper_settings(paths: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per configs/terapipe/*.args: model dims, TP, PP, DP, sequences per pipeline."""
    from megatron_terapipe.training.args import parse_args
    from megatron_terapipe.training.config_files import launch_hints

    rows = []
    for path in sorted(paths or glob.glob(CONFIG_GLOB)):
        args = parse_args(["--config", path])
        hints = launch_hints(path)
        world = int(hints.get("nnodes", 1)) * int(hints.get("nproc_per_node", 1))
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        dp = world // (tp * pp)
        rows.append({
            "config": os.path.basename(path),
            "model": os.path.basename(path).split("_b")[0],
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads,
            "seq_length": args.seq_length,
            "tensor_model_parallel": tp,
            "pipeline_stages": pp,
            "data_parallel": dp,
            "batch_size_per_pipeline": args.global_batch_size // dp // args.micro_batch_size,
        })
    return rows


def layer_measure_fn(dims: dict, dtype, clock: str, repeats: int):
    """measure(b, l, c) -> seconds of one layer's forward+backward (slicing.profiler)."""
    from megatron_terapipe.slicing.profiler import measure_fn_for_megatron_stage

    return measure_fn_for_megatron_stage(
        num_layers=1,
        hidden_size=dims["hidden_size"],
        num_attention_heads=dims["num_attention_heads"],
        tensor_model_parallel_size=dims["tensor_model_parallel"],
        pipeline_model_parallel_size=1,
        dtype=dtype,
        warmup=1,
        repeats=repeats,
        clock=clock,
    )


def grid(units: int) -> list[tuple[int, int]]:
    """The (slice units, context units) cells of one table, in measuring order."""
    return [(n, c) for n in range(1, units + 1) for c in range(0, units - n + 1)]


def layer_table(cells: dict[tuple[int, int], float], units: int):
    """latency[b, l, c] of one layer (b = 1 measured, b = 0 inf), docs/latency_table.md layout."""
    import numpy as np

    latency = np.full((2, units + 1, units + 1), np.inf)
    for (n, c), seconds in cells.items():
        latency[1, n, c] = seconds
    return latency


def predict(layer_table, setting: dict, granularity: int, seq_length: int) -> dict[str, Any]:
    """Stock 1F1B vs planned TeraPipe, simulated on the measured stage cost."""
    import numpy as np

    from megatron_terapipe.schedules.generators import build_schedule
    from megatron_terapipe.simulate import ActionCosts, simulate
    from megatron_terapipe.slicing.cost_models import AnalyticCostModel
    from megatron_terapipe.slicing.latency_table import LatencyTableCostModel
    from megatron_terapipe.slicing.planner import make_plan

    stages, batch = setting["pipeline_stages"], setting["batch_size_per_pipeline"]
    layers_per_stage = math.ceil(setting["num_layers"] / stages)
    analytic = AnalyticCostModel.from_preset(
        P2P_PRESET, num_layers=setting["num_layers"], hidden_size=setting["hidden_size"],
        num_attention_heads=setting["num_attention_heads"],
        tensor_model_parallel_size=setting["tensor_model_parallel"],
        pipeline_model_parallel_size=stages,
    )
    units = seq_length // granularity
    p2p = np.zeros((2, units + 1))
    p2p[1, 1:] = [analytic.p2p_time(1, n * granularity) for n in range(1, units + 1)]
    cost = LatencyTableCostModel(layer_table * layers_per_stage, granularity, seq_length, p2p,
                                 source=f"measured:{setting['model']}:tp{setting['tensor_model_parallel']}")
    costs = ActionCosts.from_stage_cost_model(cost, batch=1)
    stock = simulate(build_schedule("1f1b", stages, batch), [seq_length], costs)
    plan = make_plan(cost, seq_length=seq_length, num_stages=stages, batch=1,
                     batch_mode="fixed", num_microbatches=batch, strategy="dp",
                     schedule="terapipe")
    slices = list(plan.token_slices)
    tera = simulate(build_schedule("terapipe", stages, batch, len(slices)), slices, costs)
    return {
        "layers_per_stage": layers_per_stage,
        "stock_1f1b_step_s": stock.step_time,
        "terapipe_step_s": tera.step_time,
        "predicted_speedup": stock.step_time / tera.step_time,
        "token_slices": slices,
    }


def _analytic_v100(setting: dict) -> float | None:
    """benchmark/paper.py's prediction with assumed (v100 preset) costs, for comparison."""
    try:
        from megatron_terapipe.benchmark.paper import predict_setting

        models = {setting["model"]: {k: setting[k] for k in (
            "num_layers", "hidden_size", "num_attention_heads", "seq_length")}}
        return predict_setting(models, setting)["predicted_speedup"]
    except Exception:  # noqa: BLE001 - a comparison column; its absence is reported as None
        return None


def run(dry_run: bool, out_dir: str, deadline: float | None = None,
        rows: str | None = None) -> dict[str, Any]:
    """Measure every table's cells, one row each to `rows` as it is measured; the record holds
    only the counts (the rows are the result)."""
    import torch

    from megatron_terapipe.gpu_check.common import RowWriter, pick_device

    device = pick_device(dry_run)
    settings = paper_settings()
    skipped = [dict(s, reason="seq_length != 2048") for s in settings if s["seq_length"] != 2048]
    settings = [s for s in settings if s["seq_length"] == 2048]
    if dry_run:
        # Toy shapes, a 4x4 grid, the two 175B settings: the same code path in seconds.
        settings = [dict(s, num_layers=s["pipeline_stages"] * 2, hidden_size=64,
                         num_attention_heads=8, seq_length=64)
                    for s in settings if s["model"] == "gpt3-175b"]
        seq_length, granularity, dtype, clock, repeats = 64, 16, torch.float32, "cpu", 1
    else:
        seq_length, granularity, dtype, clock, repeats = 2048, 128, torch.bfloat16, "wall", 2
    units = seq_length // granularity
    tables = []
    for s in settings:
        key = {"model": s["model"], "tensor_model_parallel": s["tensor_model_parallel"],
               "hidden_size": s["hidden_size"], "num_attention_heads": s["num_attention_heads"]}
        if key not in tables:
            tables.append(key)
    # The paper's headline model first: a step cut by the budget returns its tables first.
    tables.sort(key=lambda t: t["model"] not in PAPER_HEADLINE)
    writer = RowWriter(rows or os.path.join(out_dir, "c.jsonl"))
    writer.write({
        "kind": "plan", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "seq_length": seq_length, "granularity": granularity, "clock": clock,
        "repeats": repeats, "tables": tables, "cells_per_table": len(grid(units)),
        "settings": settings,
        "skipped_settings": [{"config": s["config"], "reason": s["reason"]} for s in skipped],
    })
    for table in tables:
        measure = layer_measure_fn(table, dtype, clock, repeats)
        for n, c in grid(units):
            writer.write({"kind": "cell", "model": table["model"],
                          "tensor_model_parallel": table["tensor_model_parallel"],
                          "l": n, "c": c, "seconds": measure(1, n * granularity,
                                                             c * granularity)})
        del measure
        if device.type == "cuda":
            torch.cuda.empty_cache()
    writer.close()
    return {
        "step": "c",
        "title": TITLE,
        "status": "measured",
        "tables": len(tables),
        "cells": len(tables) * len(grid(units)),
    }


TITLE = ("per-slice cost at paper shapes (one layer, per-rank TP shapes) and the paper-scale "
         "prediction from it")


def assemble(rows: list[dict[str, Any]], record: dict[str, Any] | None, plan: bool,
             tables_out: str | None = None) -> dict[str, Any]:
    """Step c's summary record from its rows (c.jsonl) and the orchestrator's record of the
    step (None when the device call was cut off before the step's end was recorded).

    Complete tables are saved (with `tables_out`: .npz files and latency_tables.tgz there);
    incomplete ones are listed in `missing` with how many cells came back and why the rest
    did not. With `plan` (the CPU, after the device call) every setting whose table is
    complete gets TeraPipe's DP plan and the simulated speedup."""
    import numpy as np

    from megatron_terapipe.slicing.latency_table import LatencyTableCostModel

    out: dict[str, Any] = {"step": "c", "title": TITLE}
    out.update({k: v for k, v in (record or {}).items() if k not in ("tables", "cells")})
    header = next((r for r in rows if r.get("kind") == "plan"), None)
    if header is None:
        out.setdefault("status", "error")
        out["missing"] = [{"row": "every table", "got": "none", "reason": why_missing(record)}]
        return out
    seq_length, granularity = header["seq_length"], header["granularity"]
    units = seq_length // granularity
    out.update({k: header[k] for k in ("device", "dtype", "seq_length", "granularity", "clock")})
    out["p2p"] = f"analytic {P2P_PRESET} preset"
    out["note"] = ("TP all-reduces are not in the measured cost (one GPU); stage = layer x "
                   "layers per stage")
    cells: dict[tuple[str, int], dict[tuple[int, int], float]] = {}
    for r in rows:
        if r.get("kind") == "cell":
            cells.setdefault((r["model"], r["tensor_model_parallel"]), {})[r["l"], r["c"]] = \
                float(r["seconds"])
    expected = header["cells_per_table"]
    measured, missing, complete = [], [], {}
    for t in header["tables"]:
        key = (t["model"], t["tensor_model_parallel"])
        got = cells.get(key, {})
        if len(got) < expected:
            missing.append({"row": f"table {key[0]} tp{key[1]}",
                            "got": f"{len(got)}/{expected} cells", "reason": why_missing(record)})
            continue
        layer = layer_table(got, units)
        complete[key] = layer
        name = f"latency_{key[0]}_tp{key[1]}_one_layer.npz"
        if tables_out:
            table_dir = os.path.join(tables_out, "latency_tables")
            os.makedirs(table_dir, exist_ok=True)
            path = os.path.join(table_dir, name)
            LatencyTableCostModel(layer, granularity, seq_length, source=path).save(path)
        measured.append({
            "model": key[0], "tensor_model_parallel": key[1], "file": name,
            "t_full_sequence_ms": 1e3 * float(layer[1, units, 0]),
            "t_one_granule_ms": 1e3 * float(layer[1, 1, 0]),
            "t_last_granule_ms": 1e3 * float(layer[1, 1, units - 1]),
            "latency_ms": np.where(np.isfinite(layer[1]), layer[1] * 1e3, -1).round(4).tolist(),
        })
    if tables_out and complete:
        archive = os.path.join(tables_out, "latency_tables.tgz")
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(os.path.join(tables_out, "latency_tables"), arcname="latency_tables")
        out["archive"] = os.path.basename(archive)
    out["layer_tables"], out["missing"] = measured, missing
    out["skipped_settings"] = header.get("skipped_settings", [])
    settings = []
    for s in header["settings"]:
        key = (s["model"], s["tensor_model_parallel"])
        if key not in complete:
            continue
        row = dict(s)
        if plan:
            try:
                row.update(predict(complete[key], s, granularity, seq_length))
            except Exception as exc:  # noqa: BLE001 - the measured tables still count
                row["plan_error"] = f"{type(exc).__name__}: {exc}"[:300]
            row["analytic_v100_speedup"] = (None if seq_length != 2048
                                            else _analytic_v100(s))
        row["paper_headline"] = PAPER_HEADLINE.get(s["model"])
        settings.append(row)
    out["settings"], out["planned"] = settings, plan
    planned_ok = settings and not any("plan_error" in r for r in settings)
    out["status"] = completeness_status(record, bool(measured), not missing,
                                        "pass" if planned_ok else "error")
    if out["status"] == "pass" and not plan:
        out["status"] = "measured"
    return out


def completeness_status(record: dict[str, Any] | None, some: bool, all_rows: bool,
                        complete_status: str) -> str:
    """A measuring step's status from what came back: `complete_status` when every row did,
    "partial" when some did, else the orchestrator's status (timeout, error, skipped), or
    "cut off" when the device call ended before the step's end was recorded."""
    if all_rows and some:
        return complete_status
    if some:
        return "partial"
    if record is None:
        return "cut off"
    return record.get("status") if record.get("status") != "measured" else "error"


def why_missing(record: dict[str, Any] | None) -> str:
    """Why rows of a measuring step did not come back, from the orchestrator's record."""
    if record is None:
        return "the device call ended before the step did (cut off by the outer time limit)"
    if record.get("status") == "timeout":
        return record.get("reason", "killed by budget")
    if record.get("status") == "skipped":
        return record.get("reason", "skipped")
    if record.get("status") == "error":
        return f"the step failed ({record.get('reason', 'error')}; see its log)"
    return "not measured"


if __name__ == "__main__":
    step_main(run)
