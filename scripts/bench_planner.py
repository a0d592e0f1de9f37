#!/usr/bin/env python
"""Solve times of the DP planner on this machine, against the issue's targets.

    python scripts/bench_planner.py                 # the two target cases (+ context rows)
    python scripts/bench_planner.py --all-settings  # every TeraPipe paper setting, g = 8
    python scripts/bench_planner.py --json

Cases (analytic V100 model, the paper's hardware):
  gpt3-175b-g8    GPT-3 175B, batch 2, TP 8, 48 stages, seq 2048 at granularity 8: 256 units
                  (target < 0.5 s)
  32k-g64         32,768 tokens at granularity 64: 512 units; GPT-3 13B dims, TP 8,
                  40 stages, batch 1 (target < 5 s); also with 8 stages on the H100 preset,
                  where the optimum is uneven and the search works harder
Times are the whole make_plan call (table build + DP + bookkeeping), best of --repeats, with
the first (cold) run shown too. Context rows: TeraPipe's plain ascending enumeration of t_max
and a memory-capped solve of the first case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_terapipe.flag_values import MODELS  # noqa: E402
from megatron_terapipe.slicing import (  # noqa: E402
    ActivationMemoryModel,
    AnalyticCostModel,
    make_plan,
)

# TeraPipe's settings (model, batch per pipeline, TP, stages), from the authors' repository.
PAPER_SETTINGS = [
    ("gpt3-1b", 8, 1, 24), ("gpt3-1b", 16, 1, 24), ("gpt3-1b", 36, 8, 12),
    ("gpt3-1b", 48, 8, 24), ("gpt3-1b", 48, 8, 12), ("gpt3-1b", 72, 8, 24),
    ("gpt3-13b", 2, 1, 40), ("gpt3-13b", 4, 1, 40), ("gpt3-13b", 7, 1, 40),
    ("gpt3-13b", 12, 8, 20), ("gpt3-13b", 16, 8, 20), ("gpt3-13b", 20, 8, 40),
    ("gpt3-13b", 20, 8, 20), ("gpt3-13b", 32, 8, 40), ("gpt3-44b", 8, 8, 48),
    ("gpt3-44b", 4, 8, 24), ("gpt3-44b", 2, 1, 96), ("gpt3-175b", 2, 8, 48),
    ("gpt3-175b", 2, 4, 96), ("gpt3-13b-4096", 8, 8, 40), ("gpt3-13b-6144", 4, 8, 40),
    ("gpt3-13b-8192", 2, 8, 40),
]


def case(name, model, batch, tp, stages, granularity, seq=None, target=None, preset="v100",
         **plan_kw):
    layers, hidden, heads, default_seq = MODELS[model]
    dims = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=stages)
    return dict(name=name, model=model, dims=dims, batch=batch, stages=stages, preset=preset,
                seq=seq or default_seq, granularity=granularity, target=target, plan_kw=plan_kw)


def run_case(spec: dict, repeats: int) -> dict:
    cost = AnalyticCostModel.from_preset(spec["preset"], **spec["dims"])
    memory = ActivationMemoryModel(**spec["dims"])
    kw = dict(seq_length=spec["seq"], num_stages=spec["stages"], batch=spec["batch"],
              granularity=spec["granularity"], memory=memory, **spec["plan_kw"])
    times, plan = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = make_plan(cost, **kw)
        times.append(time.perf_counter() - start)
    return {
        "case": spec["name"],
        "units": spec["seq"] // spec["granularity"],
        "batch": spec["batch"],
        "stages": spec["stages"],
        "first_s": times[0],
        "best_s": min(times),
        "target_s": spec["target"],
        "meets_target": None if spec["target"] is None else min(times) < spec["target"],
        "dp_evaluations": plan.extra.get("dp_evaluations"),
        "dp_candidates": plan.extra.get("dp_candidates"),
        "num_token_slices": plan.num_token_slices,
        "batch_slices": list(plan.batch_slices),
        "predicted_step_time": plan.predicted_step_time,
        "t_max": plan.t_max,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all-settings", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cases = [
        case("gpt3-175b-g8", "gpt3-175b", 2, 8, 48, 8, target=0.5),
        case("32k-g64", "gpt3-13b", 1, 8, 40, 64, seq=32768, target=5.0),
        # Same size, a shallower pipeline on H100: uneven slices, many more DP evaluations.
        case("32k-g64 h100 pp8", "gpt3-13b", 1, 8, 8, 64, seq=32768, target=5.0, preset="h100"),
        case("gpt3-175b-g8 ascending", "gpt3-175b", 2, 8, 48, 8, method="ascending"),
        case("32k-g64 ascending", "gpt3-13b", 1, 8, 40, 64, seq=32768, method="ascending"),
        case("gpt3-175b-g8 cap 1.29GiB", "gpt3-175b", 2, 8, 48, 8, memory_cap_gib=1.29),
    ]
    if args.all_settings:
        for model, batch, tp, stages in PAPER_SETTINGS:
            cases.append(case(f"{model} b{batch} tp{tp} pp{stages}", model, batch, tp, stages, 8))
    rows = [run_case(spec, args.repeats) for spec in cases]
    if args.json:
        print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}))
        return 0
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; best of {args.repeats}")
    header = (f"{'case':34} {'units':>5} {'B':>3} {'K':>3} {'first s':>8} {'best s':>8} "
              f"{'target':>7} {'evals':>5} {'slices':>6} {'step s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "" if r["target_s"] is None else (
            f"<{r['target_s']:g} " + ("ok" if r["meets_target"] else "MISS"))
        print(f"{r['case']:34} {r['units']:>5} {r['batch']:>3} {r['stages']:>3} "
              f"{r['first_s']:>8.3f} {r['best_s']:>8.3f} {target:>7} "
              f"{r['dp_evaluations']!s:>5} {r['num_token_slices']:>6} "
              f"{r['predicted_step_time']:>9.4f}")
    missed = [r["case"] for r in rows if r["meets_target"] is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
