"""Step d: same-kernel single-stage inflation t_S / t_1 at GPT-3 13B shape.

One micro-batch through one stage (no pipeline), cut into S equal slices, S in 1, 2, 4, 8,
16: the forward+backward time relative to S = 1 (the same prefix-KV attention kernel, one
slice) and the step's peak device memory. This is what slicing costs before any bubble is
saved.

All in one process: the stage is built once (the trainer's model path, as
scripts/bench_single_stage.py builds it, whose step and memory functions are used), rounds
alternate the order of S so that drift hits every S alike, and the peak memory per S comes
after the timing rounds from `torch.cuda.max_memory_allocated` over the allocation before the
step, which a process's earlier steps do not change (unlike a CPU's resident set, which is why
the CPU benchmark takes a fresh process per S). Each measurement is appended to the rows file
(`--rows`, d.jsonl) the moment it is taken, so a step killed by the budget returns the rows it
finished; `assemble` (the summary) turns rows into the table and names what is missing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from megatron_terapipe.gpu_check.common import GPTShape, step_main

SLICE_COUNTS = (1, 2, 4, 8, 16)
# GPT-3 13B: hidden 5120, 40 heads, seq 2048; 4 of its 40 layers (t_S / t_1 is per layer).
GPU_SHAPE = GPTShape(num_layers=4, hidden_size=5120, num_attention_heads=40,
                     num_query_groups=40, seq_length=2048, vocab_size=1024,
                     position_embedding_type="learned_absolute")
DRY_SHAPE = GPTShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                     seq_length=64, vocab_size=128, position_embedding_type="learned_absolute")
GPU_ROUNDS, DRY_ROUNDS = 3, 5
WARMUP = 1
# The dry run's toy step takes milliseconds; each of its measurements repeats the step for at
# least this long (and reports the mean), so that the dry run's timed rounds last long enough
# (5 S x 5 rounds x 1.5 s = 37.5 s) for a test to cut them half-way with the real budget. 0 on
# the device: one step per measurement.
DRY_MEASURE_S = 1.5
TITLE = "same-kernel single-stage inflation t_S / t_1 (GPT-3 13B shape)"


def _stage_args(shape: GPTShape, device: str, bf16: bool) -> argparse.Namespace:
    from megatron_terapipe.benchmark.single_stage import add_args

    return add_args(argparse.ArgumentParser()).parse_args([
        "--num-layers", str(shape.num_layers), "--hidden-size", str(shape.hidden_size),
        "--num-attention-heads", str(shape.num_attention_heads),
        "--seq-length", str(shape.seq_length), "--vocab-size", str(shape.vocab_size),
        "--device", device, *(["--bf16"] if bf16 else []),
    ])


def measure(model, batch, count: int, seq_length: int, min_s: float) -> tuple[float, int]:
    """(mean seconds of one step in `count` slices, steps run): at least one step, more until
    `min_s` has passed."""
    from megatron_terapipe.benchmark.single_stage import run_step

    total, steps = 0.0, 0
    while steps == 0 or total < min_s:
        total += run_step(model, batch, count, seq_length)
        if hasattr(model, "zero_grad_buffer"):
            model.zero_grad_buffer()
        steps += 1
    return total / steps, steps


def run(dry_run: bool, out_dir: str, deadline: float | None = None,
        rows: str | None = None) -> dict[str, Any]:
    import os

    import torch

    from megatron_terapipe.benchmark.single_stage import build_stage, step_peak_bytes
    from megatron_terapipe.gpu_check.common import RowWriter, pick_device

    device = pick_device(dry_run)
    shape = DRY_SHAPE if dry_run else GPU_SHAPE
    dtype = torch.float32 if dry_run else torch.bfloat16
    rounds = DRY_ROUNDS if dry_run else GPU_ROUNDS
    min_s = DRY_MEASURE_S if dry_run else 0.0
    writer = RowWriter(rows or os.path.join(out_dir, "d.jsonl"))
    writer.write({"kind": "plan", "shape": shape.__dict__,
                  "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                  "slice_counts": list(SLICE_COUNTS), "rounds": rounds, "warmup": WARMUP,
                  "memory": True, "min_measure_s": min_s})
    args = _stage_args(shape, device.type, dtype == torch.bfloat16)
    started = time.time()
    model, batch = build_stage(args)
    writer.write({"kind": "built", "seconds": time.time() - started})
    for round_index in range(WARMUP + rounds):
        order = SLICE_COUNTS if round_index % 2 == 0 else SLICE_COUNTS[::-1]
        for count in order:
            # Warm-up rounds run one step each: they only take first-call costs out.
            seconds, steps = measure(model, batch, count, shape.seq_length,
                                     min_s if round_index >= WARMUP else 0.0)
            if round_index >= WARMUP:
                writer.write({"kind": "time", "S": count, "round": round_index - WARMUP,
                              "seconds": seconds, "steps": steps})
    for count in SLICE_COUNTS:
        peak = step_peak_bytes(model, batch, count, shape.seq_length, device.type)
        writer.write({"kind": "memory", "S": count, "peak_bytes": peak})
    writer.close()
    return {"step": "d", "title": TITLE, "status": "measured",
            "via": "benchmark.single_stage (one process)"}


def assemble(rows: list[dict[str, Any]], record: dict[str, Any] | None) -> dict[str, Any]:
    """Step d's summary record from its rows (d.jsonl): per S the median and min-max of the
    rounds that came back, t_S / t_1 of the medians, the peak memory; `missing` names every
    round or memory measurement that did not come back, and why."""
    from megatron_terapipe.gpu_check.latency import completeness_status, why_missing

    out: dict[str, Any] = {"step": "d", "title": TITLE, **(record or {})}
    header = next((r for r in rows if r.get("kind") == "plan"), None)
    if header is None:
        out["status"] = completeness_status(record, False, False, "measured")
        out["missing"] = [{"row": "every row", "got": "none", "reason": why_missing(record)}]
        return out
    out.update({k: header[k] for k in ("shape", "dtype", "device", "rounds")})
    times: dict[int, list[float]] = {}
    memory: dict[int, int] = {}
    for r in rows:
        if r.get("kind") == "time":
            times.setdefault(r["S"], []).append(float(r["seconds"]))
        elif r.get("kind") == "memory":
            memory[r["S"]] = int(r["peak_bytes"])
    base = statistics.median(times[1]) if times.get(1) else None
    table, missing = [], []
    for count in header["slice_counts"]:
        seconds = times.get(count, [])
        if len(seconds) < header["rounds"]:
            missing.append({"row": f"S={count} timing rounds",
                            "got": f"{len(seconds)}/{header['rounds']}",
                            "reason": why_missing(record)})
        if header.get("memory") and count not in memory:
            missing.append({"row": f"S={count} peak memory", "got": "0/1",
                            "reason": why_missing(record)})
        if not seconds and count not in memory:
            continue
        median = statistics.median(seconds) if seconds else None
        table.append({
            "num_token_slices": count,
            "rounds": len(seconds),
            "median_s": median,
            "min_s": min(seconds) if seconds else None,
            "max_s": max(seconds) if seconds else None,
            "t_S_over_t_1": median / base if median is not None and base else None,
            "peak_memory_gib": memory[count] / 2**30 if count in memory else None,
        })
    out["rows"], out["missing"] = table, missing
    out["status"] = completeness_status(record, bool(table), not missing, "measured")
    return out


if __name__ == "__main__":
    step_main(run)
