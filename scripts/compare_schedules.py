"""Same model, same seed, same data under stock megatron-core schedules and the token pipeline.

    python scripts/compare_schedules.py --num-microbatches 4            # CPU model of the docs
    python scripts/compare_schedules.py --num-layers 2 --hidden-size 32 --seq-length 64 --json
    python scripts/compare_schedules.py --paper-scale                    # V100 predictions only

Runs stock 1F1B, stock interleaved (when V > 1 fits), and the token pipeline (terapipe and
token-1f1b orders; equal slices and DP-planned slices) in one pair of processes, round-robin,
and prints one table (see docs/benchmarks.md for every column's definition).
"""

from __future__ import annotations

import argparse
import json
import os
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
from megatron_terapipe.benchmark.spec import (  # noqa: E402
    BenchSpec,
    stock_1f1b,
    stock_interleaved,
    token_variant,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2,
                        help="V of the stock interleaved run (skipped when it does not fit; "
                        "1 disables it)")
    parser.add_argument("--token-schedules", type=str_list, default=["terapipe", "token-1f1b"])
    parser.add_argument("--num-token-slices", type=int_list, default=[8],
                        help="equal-slice counts to run, comma separated")
    parser.add_argument("--no-planned", action="store_true", help="skip DP-planned slices")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output", help="also save the full results JSON here")
    parser.add_argument("--plot", metavar="PREFIX",
                        help="PREFIX_bars.png and PREFIX_timeline_<schedule>.png")
    parser.add_argument("--trace", metavar="PREFIX",
                        help="PREFIX_<schedule>.json Chrome/Perfetto traces of measured steps")
    parser.add_argument("--paper-scale", action="store_true",
                        help="print the V100 predictions for the paper's settings and exit")
    parser.add_argument("--timeout", type=float, default=3600.0)
    return parse_with_configs(parser, argv)


def interleaving_fits(values: dict[str, int], chunks: int) -> bool:
    """megatron-core's interleaving: equal layers per chunk, M divisible by P."""
    stages = values["pipeline_model_parallel_size"]
    layers = values["num_layers"]
    return (
        chunks > 1 and stages > 1 and layers % (stages * chunks) == 0
        and values["num_microbatches"] % stages == 0
    )


def build_spec(args: argparse.Namespace) -> BenchSpec:
    values = resolve_model_args(args)
    variants = [stock_1f1b()]
    chunks = args.virtual_pipeline_model_parallel_size
    if interleaving_fits(values, chunks):
        variants.append(stock_interleaved(chunks))
    for schedule in args.token_schedules:
        variants += [token_variant(schedule, s) for s in args.num_token_slices]
        if not args.no_planned:
            variants.append(token_variant(schedule, planned=True))
    return BenchSpec(
        model=tiny_gpt(values),
        variants=tuple(variants),
        pipeline_parallel=values["pipeline_model_parallel_size"],
        num_microbatches=values["num_microbatches"],
        micro_batch_size=values["micro_batch_size"],
        warmup=args.warmup,
        iterations=args.iterations,
        data_seed=args.data_seed,
        init_seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.paper_scale:
        from megatron_terapipe.benchmark import paper

        rows = paper.paper_predictions()
        spread = paper.sensitivity()
        if args.json:
            print(json.dumps({"results": rows, "sensitivity": spread}, indent=1))
        else:
            print(paper.format_paper_table(rows))
            print()
            print(paper.format_sensitivity(spread))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump({"results": rows, "sensitivity": spread,
                           "cost_model": paper.preset_description()}, handle, indent=1)
        return 0
    from megatron_terapipe.benchmark.compare import run_comparison
    from megatron_terapipe.benchmark.table import format_rows

    spec = build_spec(args)
    comparison = run_comparison(spec, args.threads_per_rank, args.timeout)
    data = comparison.to_dict()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, default=float)
    if args.plot:
        from megatron_terapipe.benchmark.plots import plot_comparison

        m = spec.model
        title = (f"GPT {m.num_layers}L h{m.hidden_size} s{m.seq_length}, "
                 f"PP={spec.pipeline_parallel}, M={spec.num_microbatches}")
        data["plots"] = plot_comparison(comparison, args.plot, title)
    if args.trace:
        from megatron_terapipe.benchmark.plots import slug

        data["traces"] = []
        for name, timeline in comparison.measured_timelines().items():
            path = f"{args.trace}_{slug(name)}.json"
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(timeline.to_chrome_trace(), handle)
            data["traces"].append(path)
    if args.json:
        print(json.dumps(data, indent=1, default=float))
    else:
        c = data["config"]
        print(f"GPT {c['num_layers']} layers x hidden {c['hidden_size']} "
              f"({c['num_attention_heads']} heads), seq {c['seq_length']}, "
              f"micro-batch {c['micro_batch_size']}, PP={c['pipeline_model_parallel_size']}, "
              f"M={c['num_microbatches']}; median of {c['iterations']} rounds after "
              f"{c['warmup']} warm-up; {args.threads_per_rank} thread(s)/rank")
        print(format_rows(data["results"]))
        for key in ("plots", "traces"):
            for path in data.get(key, []):
                print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
