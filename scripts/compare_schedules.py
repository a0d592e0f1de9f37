"""Same model, same seed, same data under stock megatron-core schedules and the token pipeline.

    python scripts/compare_schedules.py --num-microbatches 4            # CPU model of the docs
    python scripts/compare_schedules.py --num-layers 2 --hidden-size 32 --seq-length 64 --json
    python scripts/compare_schedules.py --paper-scale                    # V100 predictions only

Runs, in one pair of processes, round-robin: stock megatron-core 1F1B on the same attention
kernel as the token pipeline (the baseline of every ratio), stock interleaved (when V > 1 fits),
stock 1F1B on megatron-core's local-spec attention (a kernel difference, on its own line), and
the token pipeline (terapipe and token-1f1b orders; equal slices, each followed by Seq1F1B's
computation-wise split of the same S - `equal-flops`, the peer method's slicing -, `auto`
slices - what `--token-pipeline-slices auto` chooses, the product's planner - and DP-planned
slices from costs fitted to the warm-up round; planned rows show the planner's predicted step
time). Prints one table, the time breakdown per stage and a summary: verdicts judge the
per-round speedup's interval (the quiet-host gauge's rule), and every row with a spiked round
set aside is named
(docs/benchmarks.md defines every column). Model and layout flags are pretrain_gpt.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")

from megatron_terapipe.benchmark.cli_args import (  # noqa: E402
    add_contention_probe_arg,
    add_model_args,
    add_split_backward_arg,
    int_list,
    model_args,
    num_microbatches,
    parse_with_configs,
    str_list,
    virtual_stages,
)
from megatron_terapipe.benchmark.spec import (  # noqa: E402
    BenchSpec,
    equal_flops_variant,
    stock_variants,
    token_variant,
    with_split_backward,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--no-local-attention", action="store_true",
                        help="skip the stock 1F1B row on megatron-core's local-spec attention")
    parser.add_argument("--token-schedules", type=str_list, default=["terapipe", "token-1f1b"])
    parser.add_argument("--num-token-slices", type=int_list, default=[8],
                        help="equal-slice counts to run, comma separated")
    parser.add_argument("--no-planned", action="store_true",
                        help="skip DP-planned slices (fitted to the warm-up round)")
    parser.add_argument("--no-auto", action="store_true",
                        help="skip auto slices (the product's planner, profiled at start-up)")
    parser.add_argument("--equal-flops-slices", type=int_list, default=None, metavar="S,...",
                        help="slice counts of the Seq1F1B equal-flops rows (default: those of "
                        "--num-token-slices); give the auto row's S to see both side by side")
    parser.add_argument("--no-equal-flops", action="store_true",
                        help="skip the Seq1F1B equal-flops rows")
    add_split_backward_arg(parser)
    add_contention_probe_arg(parser)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5,
                        help="timed rounds (median; a verdict needs 5 for its 90 %% interval)")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="JSON results: to FILE, or printed instead of the table when no "
                        "FILE is given")
    parser.add_argument("--output", help="also save the full results JSON here")
    parser.add_argument("--plot", metavar="PREFIX",
                        help="PREFIX_bars.png and PREFIX_timeline_<schedule>.png")
    parser.add_argument("--trace", metavar="PREFIX",
                        help="PREFIX_<schedule>.json Chrome/Perfetto traces of measured steps")
    parser.add_argument("--paper-scale", action="store_true",
                        help="print the V100 predictions for the paper's settings and exit")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parse_with_configs(parser, argv)
    if args.json not in (None, "-") and not args.output:
        args.output, args.json = args.json, None  # --json FILE: the table, and JSON to FILE
    return args


def build_spec(args: argparse.Namespace) -> BenchSpec:
    """Stock interleaving uses V from --num-virtual-stages-per-pipeline-rank (or
    --num-layers-per-virtual-pipeline-stage), default 2; V = 1 leaves it out."""
    microbatches = num_microbatches(args)
    model = model_args(args, microbatches)
    chunks = virtual_stages(args) or 2
    variants, notes = stock_variants(model.num_layers, model.pipeline_model_parallel_size,
                                     microbatches, chunks, local_kernel=not args.no_local_attention)
    peers = [] if args.no_equal_flops else (
        args.num_token_slices if args.equal_flops_slices is None else args.equal_flops_slices)
    for schedule in args.token_schedules:
        try:
            peer = {s: equal_flops_variant(schedule, model, s) for s in peers}
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        for s in args.num_token_slices:
            variants.append(token_variant(schedule, s))
            if s in peer:
                variants.append(peer.pop(s))  # Seq1F1B's split of the same S, side by side
        variants += list(peer.values())
        if not args.no_auto:
            variants.append(token_variant(schedule, auto=True))
        if not args.no_planned:
            variants.append(token_variant(schedule, planned=True))
    variants = with_split_backward(variants, args.split_backward)
    return BenchSpec(
        model=model,
        variants=tuple(variants),
        pipeline_parallel=model.pipeline_model_parallel_size,
        num_microbatches=microbatches,
        micro_batch_size=model.micro_batch_size,
        warmup=args.warmup,
        iterations=args.iterations,
        data_seed=args.data_seed,
        init_seed=model.seed,
        measure_contention=not args.no_contention_probe,
        extra={"notes": notes},
    )


def peer_lines(rows: list[dict]) -> list[str]:
    """Per auto row: Seq1F1B's equal-flops split of the same S on the same order, or how to
    add it (the row's S is only known once the planner ran)."""
    from megatron_terapipe.benchmark.compare import equal_flops_peer, verdict

    lines = []
    for auto in (r for r in rows if r.get("planned_by") == "auto"):
        peer = equal_flops_peer(rows, auto)
        s = auto["num_token_slices"]
        if peer is None:
            lines.append(f"{auto['schedule']} (S={s}): no equal-flops row of the same S "
                         f"(--equal-flops-slices {s} adds one)")
            continue
        lines.append(
            f"{auto['schedule']} {auto['token_slices']}: {auto['step_time']:.3f} s vs "
            f"Seq1F1B's {peer['schedule']} {peer['token_slices']}: {peer['step_time']:.3f} s "
            f"({100 * (auto['step_time'] / peer['step_time'] - 1):+.1f} %, "
            f"{verdict(auto['step_times'], peer['step_times'])})")
    return lines


def set_aside_lines(rows: list[dict]) -> list[str]:
    """The rows whose verdict set spiked rounds aside (the table's min-max shows all rounds)."""
    named = [f"{r['schedule']} {r['rounds_set_aside']} of {len(r['step_times'])}"
             for r in rows if r.get("rounds_set_aside")]
    if not named:
        return []
    return ["verdicts judged without spiked rounds (the quiet-host gauge's rule): "
            + ", ".join(named) + " rounds set aside"]


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
    from megatron_terapipe.benchmark.contention import contention_note
    from megatron_terapipe.benchmark.table import BREAKDOWN_COLUMNS, format_rows, format_summary

    spec = build_spec(args)
    comparison = run_comparison(spec, args.threads_per_rank, args.timeout)
    data = comparison.to_dict()
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
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, default=float)
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
        print()
        print("where the time goes (measured timeline, per stage 0/1/...; t_S/t_1 = summed "
              "compute over the baseline's)")
        print(format_rows(data["results"], BREAKDOWN_COLUMNS))
        print()
        print(format_summary(data["results"]))
        for line in peer_lines(data["results"]) + set_aside_lines(data["results"]):
            print(line)
        if data.get("contention"):
            print(contention_note(data["contention"], c["num_microbatches"]))
        for note in c["notes"]:
            print(f"note: {note}")
        for key in ("plots", "traces"):
            for path in data.get(key, []):
                print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
