"""Step time of stock megatron-core 1F1B vs the token pipeline on this machine, side by side.

    python scripts/bench_step.py                       # GPT 8L x h256, seq 2048, PP=2, M=1 and 4
    python scripts/bench_step.py --num-microbatches 1 --num-token-slices 8 --iterations 3

For each M, one pair of gloo ranks (1 thread each) runs every variant round-robin: stock 1F1B
(megatron-core's own get_forward_backward_func, DotProductAttention), the token pipeline with
S = 1 (same schedule shape as stock, but our SDPA attention: the kernel baseline), and the token
pipeline with S in --num-token-slices for each order in --schedules. Reported: median step time
over the timed rounds, the ratio to stock 1F1B, and the ratio to token S = 1 (the schedule's own
gain with the attention kernel held equal).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")

from megatron_terapipe.benchmark.cli_args import (  # noqa: E402
    add_model_args,
    int_list,
    parse_with_configs,
    resolve_model_args,
    str_list,
    tiny_gpt,
)
from megatron_terapipe.benchmark.spec import BenchSpec, stock_1f1b, token_variant  # noqa: E402

TARGETS = {1: 1.6, 4: 1.15}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.set_defaults(num_microbatches=None)
    parser.add_argument("--microbatch-counts", type=int_list, default=[1, 4],
                        help="values of M to run (overrides --num-microbatches), comma separated")
    parser.add_argument("--num-token-slices", type=int_list, default=[4, 8, 16])
    parser.add_argument("--schedules", type=str_list, default=["terapipe", "token-1f1b"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--output", help="save the results (JSON) here")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0)
    return parse_with_configs(parser, argv)


def spec_for(args: argparse.Namespace, num_microbatches: int) -> BenchSpec:
    args.num_microbatches = num_microbatches
    values = resolve_model_args(args)
    variants = [stock_1f1b(), token_variant("terapipe", 1)]
    variants += [token_variant(schedule, s) for schedule in args.schedules
                 for s in args.num_token_slices if s > 1]
    return BenchSpec(
        model=tiny_gpt(values),
        variants=tuple(variants),
        pipeline_parallel=values["pipeline_model_parallel_size"],
        num_microbatches=num_microbatches,
        micro_batch_size=values["micro_batch_size"],
        warmup=args.warmup,
        iterations=args.iterations,
        data_seed=args.data_seed,
        init_seed=args.seed,
    )


def summarise(rows: list[dict], num_microbatches: int) -> dict:
    stock = next(r for r in rows if r["kind"] == "stock-1f1b")
    kernel = next(r for r in rows if r["kind"] == "token" and r["num_token_slices"] == 1)
    out = []
    for r in rows:
        out.append({
            "schedule": r["schedule"],
            "num_token_slices": r["num_token_slices"],
            "step_time": r["step_time"],
            "step_times": r["step_times"],
            "vs_stock": stock["step_time"] / r["step_time"],
            "vs_token_s1": kernel["step_time"] / r["step_time"],
            "bubble_measured": r["bubble_measured"],
            "peak_activation_mib": r["peak_activation_mib"],
            "max_loss_diff": r["max_loss_diff"],
        })
    best = min((r for r in out if r["num_token_slices"] > 1), key=lambda r: r["step_time"])
    return {
        "num_microbatches": num_microbatches,
        "rows": out,
        "best": best["schedule"],
        "best_vs_stock": best["vs_stock"],
        "best_vs_token_s1": best["vs_token_s1"],
        "kernel_gain": stock["step_time"] / kernel["step_time"],
        "target": TARGETS.get(num_microbatches),
    }


def format_summary(summary: dict) -> str:
    lines = [f"M = {summary['num_microbatches']}",
             f"  {'schedule':20s} {'step s (median)':>15s} {'rounds':>28s} "
             f"{'vs stock':>9s} {'vs token S=1':>13s}"]
    for r in summary["rows"]:
        rounds = " ".join(f"{t:.2f}" for t in r["step_times"])
        lines.append(f"  {r['schedule']:20s} {r['step_time']:15.3f} {rounds:>28s} "
                     f"{r['vs_stock']:8.2f}x {r['vs_token_s1']:12.2f}x")
    target = summary["target"]
    verdict = "" if target is None else (
        f" (target >= {target}x: {'met' if summary['best_vs_stock'] >= target else 'NOT met'})")
    lines.append(f"  best: {summary['best']}: {summary['best_vs_stock']:.2f}x over stock 1F1B"
                 f"{verdict}; {summary['best_vs_token_s1']:.2f}x over token S=1 (same kernel); "
                 f"kernel alone (stock -> token S=1): {summary['kernel_gain']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megatron_terapipe.benchmark.compare import run_comparison

    args = parse_args(argv)
    summaries = []
    for count in args.microbatch_counts:
        spec = spec_for(args, count)
        comparison = run_comparison(spec, args.threads_per_rank, args.timeout)
        summary = summarise(comparison.rows, count)
        summary["config"] = comparison.to_dict()["config"]
        summaries.append(summary)
        if not args.json:
            print(format_summary(summary), flush=True)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"results": summaries}, handle, indent=1, default=float)
    if args.json:
        print(json.dumps({"results": summaries}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
