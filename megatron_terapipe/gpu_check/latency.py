"""Step c: measured per-slice cost at paper shapes, and the paper-scale prediction from it.

For each (model, tensor-parallel size) of configs/terapipe/*.args at sequence 2048: the
forward+backward seconds t(l, c) of ONE transformer layer with the per-rank shapes of that TP
size (heads/t, ffn/t: the matmuls one rank runs; the TP all-reduces are not in it, one GPU has
no TP group), bf16, for every slice length l and context c on a grid of `granularity` tokens,
with the prefix keys/values in place as in a real step (slicing.profiler's measure function).
Saved as the planner's latency tables (docs/latency_table.md), one layer per file.

Then, per setting: the stage table (layer table x layers per stage), P2P from the analytic
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


def measure_layer_table(dims: dict, seq_length: int, granularity: int, dtype, clock: str,
                        repeats: int):
    """latency[b, l, c] of one layer (b = 1 measured, b = 0 inf), docs/latency_table.md layout."""
    import numpy as np

    from megatron_terapipe.slicing.profiler import measure_fn_for_megatron_stage

    measure = measure_fn_for_megatron_stage(
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
    units = seq_length // granularity
    latency = np.full((2, units + 1, units + 1), np.inf)
    for n in range(1, units + 1):
        for c in range(0, units - n + 1):
            latency[1, n, c] = measure(1, n * granularity, c * granularity)
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


def run(dry_run: bool, out_dir: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from megatron_terapipe.gpu_check.common import pick_device
    from megatron_terapipe.slicing.latency_table import LatencyTableCostModel

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
    table_dir = os.path.join(out_dir, "latency_tables")
    os.makedirs(table_dir, exist_ok=True)
    tables: dict[tuple[str, int], Any] = {}
    measured = []
    for s in settings:
        key = (s["model"], s["tensor_model_parallel"])
        if key in tables:
            continue
        layer = measure_layer_table(s, seq_length, granularity, dtype, clock, repeats)
        tables[key] = layer
        path = os.path.join(table_dir, f"latency_{key[0]}_tp{key[1]}_one_layer.npz")
        LatencyTableCostModel(layer, granularity, seq_length, source=path).save(path)
        units = seq_length // granularity
        measured.append({
            "model": key[0], "tensor_model_parallel": key[1], "file": os.path.basename(path),
            "t_full_sequence_ms": 1e3 * float(layer[1, units, 0]),
            "t_one_granule_ms": 1e3 * float(layer[1, 1, 0]),
            "t_last_granule_ms": 1e3 * float(layer[1, 1, units - 1]),
            "latency_ms": np.where(np.isfinite(layer[1]), layer[1] * 1e3, -1).round(4).tolist(),
        })
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for s in settings:
        row = dict(s, **predict(tables[s["model"], s["tensor_model_parallel"]], s, granularity,
                                seq_length))
        row["analytic_v100_speedup"] = None if dry_run else _analytic_v100(s)
        row["paper_headline"] = PAPER_HEADLINE.get(s["model"])
        rows.append(row)
    archive = os.path.join(out_dir, "latency_tables.tgz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(table_dir, arcname="latency_tables")
    return {
        "step": "c",
        "title": "per-slice cost at paper shapes (one layer, per-rank TP shapes) and the "
        "paper-scale prediction from it",
        "status": "pass" if rows else "error",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seq_length": seq_length,
        "granularity": granularity,
        "clock": clock,
        "p2p": f"analytic {P2P_PRESET} preset",
        "note": "TP all-reduces are not in the measured cost (one GPU); stage = layer x layers "
        "per stage",
        "layer_tables": measured,
        "archive": os.path.basename(archive),
        "settings": rows,
        "skipped_settings": [{"config": s["config"], "reason": s["reason"]} for s in skipped],
    }


if __name__ == "__main__":
    step_main(run)
