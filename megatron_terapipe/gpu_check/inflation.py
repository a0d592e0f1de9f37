"""Step d: same-kernel single-stage inflation t_S / t_1 at GPT-3 13B shape.

One micro-batch through one stage (no pipeline), cut into S equal slices, S in 1, 2, 4, 8,
16: the forward+backward time relative to S = 1 (the same prefix-KV attention kernel, one
slice) and the peak device memory. This is what slicing costs before any bubble is saved.

Measured by scripts/bench_single_stage.py (its JSON is kept as is), the CPU benchmark of the
same quantity, so both report one thing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from megatron_terapipe.gpu_check.common import GPTShape, step_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "scripts", "bench_single_stage.py")
SLICE_COUNTS = (1, 2, 4, 8, 16)
# GPT-3 13B: hidden 5120, 40 heads, seq 2048; 4 of its 40 layers (t_S / t_1 is per layer;
# the bench script builds the model once per S for its memory figures).
GPU_SHAPE = GPTShape(num_layers=4, hidden_size=5120, num_attention_heads=40,
                     num_query_groups=40, seq_length=2048, vocab_size=1024,
                     position_embedding_type="learned_absolute")
DRY_SHAPE = GPTShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                     seq_length=64, vocab_size=128, position_embedding_type="learned_absolute")


def _bench_script(shape: GPTShape, device: str, rounds: int, bf16: bool, json_path: str,
                  timeout_s: float, memory: bool) -> dict[str, Any]:
    cmd = [sys.executable, BENCH, "--num-layers", str(shape.num_layers), "--hidden-size",
           str(shape.hidden_size), "--num-attention-heads", str(shape.num_attention_heads),
           "--seq-length", str(shape.seq_length), "--num-token-slices",
           ",".join(map(str, SLICE_COUNTS)), "--rounds", str(rounds), "--device", device,
           "--json", json_path] + (["--bf16"] if bf16 else []) + ([] if memory else
                                                                  ["--no-memory"])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not os.path.exists(json_path):
        tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
        return {"error": f"{os.path.basename(BENCH)} exit status {done.returncode}",
                "log_tail": tail, "command": cmd}
    with open(json_path, encoding="utf-8") as handle:
        result = json.load(handle)
    out: dict[str, Any] = {"command": cmd, "result": result}
    by_slices = result.get("by_slices") if isinstance(result, dict) else None
    if isinstance(by_slices, dict):  # the script's summary: {S: {median_s, min_s, ...}}
        out["rows"] = [
            {
                "num_token_slices": int(count),
                "median_s": row.get("median_s"),
                "min_s": row.get("min_s"),
                "max_s": None,
                "t_S_over_t_1": row.get("time_ratio_median"),
                "peak_memory_gib": (row["peak_bytes"] / 2**30 if row.get("peak_bytes")
                                    else None),
            }
            for count, row in sorted(by_slices.items(), key=lambda kv: int(kv[0]))
        ]
    return out


def run(dry_run: bool, out_dir: str) -> dict[str, Any]:
    import torch

    from megatron_terapipe.gpu_check.common import pick_device

    device = pick_device(dry_run)
    shape = DRY_SHAPE if dry_run else GPU_SHAPE
    dtype = torch.float32 if dry_run else torch.bfloat16
    rounds = 1 if dry_run else 3
    record: dict[str, Any] = {
        "step": "d",
        "title": "same-kernel single-stage inflation t_S / t_1 (GPT-3 13B shape)",
        "shape": shape.__dict__,
        "dtype": str(dtype).replace("torch.", ""),
        "rounds": rounds,
    }
    out = _bench_script(shape, device.type, rounds, dtype == torch.bfloat16,
                        os.path.join(out_dir, "d_bench_single_stage.json"), 140,
                        memory=not dry_run)
    record.update(via="scripts/bench_single_stage.py", **out)
    record["status"] = "error" if "error" in out else "measured"
    return record

if __name__ == "__main__":
    step_main(run)
