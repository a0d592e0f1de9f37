"""Paper-scale prediction: TeraPipe vs stock 1F1B for the TeraPipe paper's settings, simulated.

For each setting of ../shared/reference/terapipe_settings.json (model, sequences per pipeline
B, TP, PP), the analytic cost model with its V100 preset prices one stage, and the schedule
simulator runs
- stock 1F1B: B micro-batches of one sequence (Megatron's smallest micro-batch, hence its
  smallest bubble), whole sequences;
- TeraPipe: the same B micro-batches, each cut into the DP planner's token slices (TeraPipe's
  Algorithm 1 on the same cost model), GPipe order at slice granularity.
The ratio of simulated step times is the predicted speedup. Data parallelism does not enter:
both schedules pay the same gradient all-reduce, which neither simulation includes.
"""

from __future__ import annotations

import json
import os
from typing import Any

SETTINGS_PATH = os.path.normpath(os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "reference", "terapipe_settings.json"))
PAPER_HEADLINE = {"gpt3-175b": 5.0}
PRESET = "v100"


def load_settings(path: str = SETTINGS_PATH) -> tuple[dict, list[dict]]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    columns = data["columns"]
    settings = [dict(zip(columns, row)) for row in data["settings"]]
    return data, settings


# Rates a 2020 V100 cluster plausibly had beyond the data-sheet preset, to show how far the
# prediction moves with them (sensitivity, not measurements): per-layer fixed cost of launching
# ~30 kernels per forward+backward with 2020 PyTorch, and TCP/NCCL latency between nodes.
SENSITIVITY = {
    "preset": {},
    "overhead 300us/layer": {"overhead_s": 300e-6},
    "P2P latency 300us": {"link_latency_s": 300e-6},
    "both": {"overhead_s": 300e-6, "link_latency_s": 300e-6},
    "both + efficiency 0.3": {"overhead_s": 300e-6, "link_latency_s": 300e-6,
                              "efficiency": 0.3},
    "thin slices n1/2=128": {"thin_slice_half_tokens": 128},
    "thin slices n1/2=512": {"thin_slice_half_tokens": 512},
    "both + thin n1/2=512": {"overhead_s": 300e-6, "link_latency_s": 300e-6,
                             "thin_slice_half_tokens": 512},
}


class ThinSliceSlowdown:
    """A stage cost model whose compute slows down for thin slices: t · (1 + n½ / (b·l)).

    The analytic model runs every GEMM at one efficiency; a GPU's does not hold up for a few
    dozen rows (a 64-token slice gives 64-row GEMMs and short attention queries). n½ is the
    token count at which a stage runs at half its large-slice speed. A sensitivity knob, not a
    measurement.
    """

    supports_arrays = True

    def __init__(self, base: Any, half_tokens: float) -> None:
        self.base = base
        self.half_tokens = half_tokens
        self.name = f"{base.name}+thin-slice n1/2={half_tokens:g}"

    def forward_backward_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        import numpy as np

        tokens = np.asarray(batch, dtype=np.float64) * np.asarray(slice_len, dtype=np.float64)
        out = self.base.forward_backward_time(batch, slice_len, context_len) * (
            1.0 + self.half_tokens / tokens)
        return float(out) if np.ndim(out) == 0 else out

    def p2p_time(self, batch: Any, slice_len: Any) -> Any:
        return self.base.p2p_time(batch, slice_len)


def predict_setting(models: dict, setting: dict, preset: str = PRESET,
                    rates: dict | None = None) -> dict[str, Any]:
    from megatron_terapipe.schedules.generators import build_schedule
    from megatron_terapipe.simulate import ActionCosts, simulate
    from megatron_terapipe.slicing.cost_models import AnalyticCostModel
    from megatron_terapipe.slicing.planner import make_plan

    dims = models[setting["model"]]
    stages = setting["pipeline_stages"]
    batch = setting["batch_size_per_pipeline"]
    seq = dims["seq_length"]
    cost = AnalyticCostModel.from_preset(
        preset,
        num_layers=dims["num_layers"],
        hidden_size=dims["hidden_size"],
        num_attention_heads=dims["num_attention_heads"],
        tensor_model_parallel_size=setting["tensor_model_parallel"],
        pipeline_model_parallel_size=stages,
    )
    rates = dict(rates or {})
    half_tokens = rates.pop("thin_slice_half_tokens", None)
    if rates:
        cost = cost.with_rates(**rates)
    if half_tokens:
        cost = ThinSliceSlowdown(cost, half_tokens)
    costs = ActionCosts.from_stage_cost_model(cost, batch=1)
    stock = simulate(build_schedule("1f1b", stages, batch), [seq], costs)
    plan = make_plan(cost, seq_length=seq, num_stages=stages, batch=1, batch_mode="fixed",
                     num_microbatches=batch, strategy="dp", schedule="terapipe")
    slices = list(plan.token_slices)
    tera = simulate(build_schedule("terapipe", stages, batch, len(slices)), slices, costs)
    return {
        "model": setting["model"],
        "seq_length": seq,
        "batch_size_per_pipeline": batch,
        "tensor_model_parallel": setting["tensor_model_parallel"],
        "pipeline_stages": stages,
        "data_parallel": setting["data_parallel"],
        "stock_1f1b_step_time": stock.step_time,
        "terapipe_step_time": tera.step_time,
        "predicted_speedup": stock.step_time / tera.step_time,
        "num_token_slices": len(slices),
        "token_slices": slices,
        "stock_bubble": stock.mean_bubble_fraction,
        "terapipe_bubble": tera.mean_bubble_fraction,
        "paper_headline": PAPER_HEADLINE.get(setting["model"]),
    }


def paper_predictions(path: str = SETTINGS_PATH, preset: str = PRESET,
                      rates: dict | None = None) -> list[dict[str, Any]]:
    data, settings = load_settings(path)
    return [predict_setting(data["models"], s, preset, rates) for s in settings]


def sensitivity(model: str = "gpt3-175b", path: str = SETTINGS_PATH,
                preset: str = PRESET) -> list[dict[str, Any]]:
    """Predicted speedup of `model`'s settings under each SENSITIVITY variant of the rates."""
    data, settings = load_settings(path)
    rows = []
    for label, rates in SENSITIVITY.items():
        for s in settings:
            if s["model"] == model:
                row = predict_setting(data["models"], s, preset, rates)
                rows.append({"rates": label, **{k: row[k] for k in (
                    "model", "tensor_model_parallel", "pipeline_stages",
                    "batch_size_per_pipeline", "predicted_speedup", "num_token_slices")}})
    return rows


def format_sensitivity(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'rates (v100 preset +)':24s} {'TP':>3s} {'PP':>3s} {'B':>3s} {'S':>4s} "
             f"{'speedup':>8s}"]
    for r in rows:
        lines.append(f"{r['rates']:24s} {r['tensor_model_parallel']:3d} "
                     f"{r['pipeline_stages']:3d} {r['batch_size_per_pipeline']:3d} "
                     f"{r['num_token_slices']:4d} {r['predicted_speedup']:7.2f}x")
    return "\n".join(lines)


def preset_description(preset: str = PRESET) -> str:
    from megatron_terapipe.slicing.cost_models import DEVICE_PRESETS

    rates = DEVICE_PRESETS[preset]
    return (f"analytic cost model, {preset} preset: peak {rates.peak_tflops:g} TFLOP/s x "
            f"efficiency {rates.efficiency:g} = {rates.peak_tflops * rates.efficiency:g} TFLOP/s, "
            f"HBM {rates.mem_bandwidth_gbps:g} GB/s, P2P {rates.link_bandwidth_gbps:g} GB/s + "
            f"{rates.link_latency_s * 1e6:g} us, TP all-reduce {rates.tp_bandwidth_gbps:g} GB/s, "
            f"{rates.overhead_s * 1e6:g} us per layer per forward+backward")


def format_paper_table(rows: list[dict[str, Any]], preset: str = PRESET) -> str:
    header = (f"{'model':14s} {'B':>3s} {'TP':>3s} {'PP':>3s} {'stock 1F1B s':>12s} "
              f"{'TeraPipe s':>11s} {'S':>4s} {'bubble stock':>12s} {'bubble TP':>9s} "
              f"{'speedup':>8s} {'paper':>6s}")
    lines = [preset_description(preset), header, "-" * len(header)]
    for r in rows:
        paper = f"{r['paper_headline']:.1f}x" if r["paper_headline"] else ""
        lines.append(
            f"{r['model']:14s} {r['batch_size_per_pipeline']:3d} "
            f"{r['tensor_model_parallel']:3d} {r['pipeline_stages']:3d} "
            f"{r['stock_1f1b_step_time']:12.3f} {r['terapipe_step_time']:11.3f} "
            f"{r['num_token_slices']:4d} {r['stock_bubble']:12.1%} {r['terapipe_bubble']:9.1%} "
            f"{r['predicted_speedup']:7.2f}x {paper:>6s}"
        )
    return "\n".join(lines)
