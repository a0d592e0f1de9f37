"""Step time of the token pipeline against stock megatron-core on the same attention kernel.

    python scripts/bench_step.py                       # GPT 8L x h256, seq 2048, PP=2, M=1 and 4
    python scripts/bench_step.py --microbatch-counts 1 --num-token-slices 8 --iterations 3

For each M, one pair of gloo ranks (1 thread each) runs every variant round-robin:
- stock 1F1B: megatron-core's own get_forward_backward_func on the token-pipeline layer spec,
  which outside a token step is plain causal SDPA: same kernel, weights and data as the token
  pipeline. Every ratio and verdict below is against this row (the baseline);
- stock interleaved, where megatron-core can interleave (M divisible by PP);
- stock 1F1B on megatron-core's local-spec DotProductAttention: a kernel difference, reported
  on its own line, never as the schedule's gain;
- the token pipeline with S in --num-token-slices for each order in --schedules;
- per order and S in --equal-flops-slices (default: --num-token-slices), next to the equal row
  of that S, Seq1F1B's computation-wise split (`equal-flops`: slices of equal FLOPs on the
  analytic model's count, on the planner's granule grid), the peer method's slicing;
- per order, an `auto` row: the slices `--token-pipeline-slices auto` chooses for these very
  arguments (the product's planner and default cost model, profiled at start-up on rank 0).
Reported: median step time over the timed rounds; the speedup over the baseline, taken per
round (the variants' rounds are interleaved, so round i of both ran under the same load), as
its median with a 90 % confidence interval (a spiked round set aside and counted), and a
verdict (faster / slower, or a tie when the interval holds 1); for each auto row the planner's
predicted step time next to the measured one, its distance to the best equal-S row of the same
order (goal: within 5 %) and to the equal-flops row of its own S. Goals are judged by the
quiet-host gauge (benchmark/host_noise.py): met or NOT met when the interval is on one side of
the bound, not decided when the bound is inside it or the host is noisy. Model and layout flags
are pretrain_gpt.py's. `--rejudge FILE` prints a saved run's tables again with the current gauge.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")

from megatron_terapipe.benchmark.cli_args import (  # noqa: E402
    add_contention_probe_arg,
    add_model_args,
    add_split_backward_arg,
    int_list,
    model_args,
    parse_with_configs,
    str_list,
    virtual_stages,
)
from megatron_terapipe.benchmark.contention import contention_note  # noqa: E402
from megatron_terapipe.benchmark.host_noise import (  # noqa: E402
    CONFIDENCE,
    Judgement,
    judge_ratio,
    noise_note,
    round_spread,
)
from megatron_terapipe.benchmark.spec import (  # noqa: E402
    BenchSpec,
    equal_flops_variant,
    stock_variants,
    token_variant,
    with_split_backward,
)

# Goals for the best token variant over same-kernel stock 1F1B (PP=2, 8 layers,
# h256, seq 2048); the limits are 2x (M=1) and 1.25x (M=4), the 1F1B bubble.
TARGETS = {1: 1.65, 4: 1.10}
AUTO_TOLERANCE = 0.05  # auto within 5 % of the best equal-S


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--microbatch-counts", type=int_list, default=[1, 4],
                        help="values of M to run (overrides --num-microbatches), comma separated")
    parser.add_argument("--num-token-slices", type=int_list, default=[4, 8, 16])
    parser.add_argument("--schedules", type=str_list, default=["terapipe", "token-1f1b"])
    parser.add_argument("--no-auto", action="store_true",
                        help="skip the auto rows (the product's planner, profiled at start-up)")
    parser.add_argument("--equal-flops-slices", type=int_list, default=None, metavar="S,...",
                        help="slice counts of the Seq1F1B equal-flops rows (default: those of "
                        "--num-token-slices); give the auto row's S to see both side by side")
    parser.add_argument("--no-equal-flops", action="store_true",
                        help="skip the Seq1F1B equal-flops rows")
    parser.add_argument("--no-local-attention", action="store_true",
                        help="skip the stock 1F1B row on megatron-core's local-spec attention")
    add_split_backward_arg(parser)
    add_contention_probe_arg(parser)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=8,
                        help="timed rounds (median; at least 5 for the goals' 90 %% interval, "
                        "8 leave a spiked round out of it)")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--output", help="save the results (JSON) here")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="JSON results: to FILE, or printed instead of the table when no "
                        "FILE is given")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--rejudge", metavar="FILE",
                        help="run nothing: print the tables of a run saved with --json FILE, "
                        "its goals judged again from the saved rounds")
    args = parse_with_configs(parser, argv)
    if args.json not in (None, "-") and not args.output:
        args.output, args.json = args.json, None  # --json FILE: the table, and JSON to FILE
    if args.num_microbatches is not None:
        args.microbatch_counts = [args.num_microbatches]
    return args


def spec_for(args: argparse.Namespace, num_microbatches: int) -> BenchSpec:
    model = model_args(args, num_microbatches)
    variants, notes = stock_variants(model.num_layers, model.pipeline_model_parallel_size,
                              num_microbatches, virtual_stages(args) or 2,
                              local_kernel=not args.no_local_attention)
    for schedule in args.schedules:
        variants += token_rows(args, schedule, model)
    variants = with_split_backward(variants, args.split_backward)
    return BenchSpec(
        model=model,
        variants=tuple(variants),
        pipeline_parallel=model.pipeline_model_parallel_size,
        num_microbatches=num_microbatches,
        micro_batch_size=model.micro_batch_size,
        warmup=args.warmup,
        iterations=args.iterations,
        data_seed=args.data_seed,
        init_seed=model.seed,
        measure_contention=not args.no_contention_probe,
        extra={"notes": notes},
    )


def equal_flops_counts(args: argparse.Namespace) -> list[int]:
    """S of the equal-flops rows: --equal-flops-slices, else --num-token-slices; none with
    --no-equal-flops."""
    if args.no_equal_flops:
        return []
    counts = args.num_token_slices if args.equal_flops_slices is None else args.equal_flops_slices
    return list(counts)


def token_rows(args: argparse.Namespace, schedule: str, model: argparse.Namespace) -> list:
    """One order's token rows: each equal S followed by Seq1F1B's split of the same S, the
    equal-flops counts not among the equal ones, then auto (rows of one S side by side)."""
    peers = equal_flops_counts(args)
    try:
        peer = {s: equal_flops_variant(schedule, model, s) for s in peers}
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rows = []
    for s in args.num_token_slices:
        rows.append(token_variant(schedule, s))
        if s in peer:
            rows.append(peer.pop(s))
    rows += list(peer.values())
    if not args.no_auto:
        rows.append(token_variant(schedule, auto=True))
    return rows


ROW_KEYS = ("schedule", "kind", "order", "split_backward", "attention", "attention_kernel",
            "baseline", "slicing_strategy", "num_token_slices", "token_slices", "planned_by",
            "planner_predicted_step_time", "planner_error", "plan_cost_model",
            "plan_profile_seconds", "step_time",
            "step_time_min", "step_time_max", "step_times", "speedup", "speedup_low",
            "speedup_high", "speedup_confidence", "rounds_set_aside", "verdict",
            "bubble_measured", "compute_s", "comm_wait_s", "idle_s", "inflation",
            "peak_activation_mib", "page_faults", "weight_grad_share", "max_loss_diff")


def summarise(rows: list[dict], num_microbatches: int) -> dict:
    """The rows (baseline first) and the best token variant against the baseline; the goal is
    judged on the per-round speedup of that row (`host_noise.judge_ratio`)."""
    out = sorted(({k: r.get(k) for k in ROW_KEYS} for r in rows), key=lambda r: not r["baseline"])
    baseline = out[0]
    token = [r for r in out if r["kind"] == "token"]
    best = min(token, key=lambda r: r["step_time"]) if token else None
    kernel = [r for r in out if r["attention"] != baseline["attention"]]
    target = TARGETS.get(num_microbatches)
    base_times = baseline["step_times"] or []
    # The goal is against the strongest stock schedule on the same kernel (1F1B, or
    # interleaved where it runs and is faster), not only against the table's baseline.
    strongest = min((r for r in out if r["kind"] != "token"
                     and r["attention"] == baseline["attention"]), key=lambda r: r["step_time"])
    goal = (judge_ratio(strongest["step_times"] or [], best["step_times"] or [], target,
                        at_least=True) if best and target else None)
    return {
        "num_microbatches": num_microbatches,
        "baseline": baseline["schedule"],
        "rows": out,
        "best": best["schedule"] if best else None,
        "best_speedup": best["speedup"] if best else None,
        "best_interval": [best["speedup_low"], best["speedup_high"]] if best else None,
        "best_rounds_set_aside": best["rounds_set_aside"] if best else None,
        "best_verdict": best["verdict"] if best else None,
        "target": target,
        "goal_against": strongest["schedule"],
        # None (not decided): the bound is inside the interval, or the host is noisy
        "goal": goal.to_dict() if goal else None,
        "target_met": goal.met if goal else None,
        "undecided_reason": goal.reason if goal else None,
        "host_quiet": (not goal.host_noisy) if goal and goal.enough_rounds else None,
        "baseline_spread": round_spread(base_times),
        "host_note": noise_note({baseline["schedule"]: base_times}),
        "kernel_difference": {r["schedule"]: r["step_time"] / baseline["step_time"]
                              for r in kernel},
        "auto": auto_summary(token),
    }


def auto_summary(token_rows: list[dict]) -> list[dict]:
    """Per order with an auto row: its slices, predicted and measured step time, its distance
    to the fastest equal-S row of the same order (per-round ratio, judged against the 5 %
    tolerance by the quiet-host gauge), and to Seq1F1B's equal-flops split of the same S when
    the run has that row (the peer)."""
    from megatron_terapipe.benchmark.compare import equal_flops_peer, verdict

    out = []
    for auto in (r for r in token_rows if r["planned_by"] == "auto"):
        equal = [r for r in token_rows if r["order"] == auto["order"] and not r["planned_by"]
                 and not r.get("slicing_strategy")
                 and r["split_backward"] == auto["split_backward"]]
        best = min(equal, key=lambda r: r["step_time"]) if equal else None
        within: Judgement | None = (
            judge_ratio(auto["step_times"] or [], best["step_times"] or [],
                        1.0 + AUTO_TOLERANCE, at_least=False) if best else None)
        peer = equal_flops_peer(token_rows, auto)
        out.append({
            "schedule": auto["schedule"],
            "token_slices": auto["token_slices"],
            "cost_model": auto["plan_cost_model"],
            "profile_seconds": auto["plan_profile_seconds"],
            "predicted_step_time": auto["planner_predicted_step_time"],
            "measured_step_time": auto["step_time"],
            "prediction_error": auto["planner_error"],
            "best_equal": best["schedule"] if best else None,
            "best_equal_step_time": best["step_time"] if best else None,
            "vs_best_equal": (within.interval.median - 1.0
                              if within is not None and within.interval else None),
            "vs_best_equal_interval": ([within.interval.low - 1.0, within.interval.high - 1.0]
                                       if within is not None and within.interval else None),
            "within_tolerance": within.met if within is not None else None,
            "within_tolerance_reason": within.reason if within is not None else None,
            "equal_flops": peer["schedule"] if peer else None,
            "equal_flops_slices": peer["token_slices"] if peer else None,
            "equal_flops_step_time": peer["step_time"] if peer else None,
            "vs_equal_flops": auto["step_time"] / peer["step_time"] - 1.0 if peer else None,
            # auto's rounds against the peer's, by the baseline verdict's rule
            "vs_equal_flops_verdict": verdict(auto["step_times"] or [], peer["step_times"] or [])
            if peer else None,
        })
    return out


def format_auto(entry: dict) -> str:
    pred = entry["predicted_step_time"]
    line = (f"  {entry['schedule']}: slices {entry['token_slices']} (S={len(entry['token_slices'])}"
            f", {entry['cost_model']}); planner predicted "
            + ("-" if pred is None else f"{pred:.3f} s")
            + f", measured {entry['measured_step_time']:.3f} s")
    if entry["prediction_error"] is not None:
        line += f" ({100 * entry['prediction_error']:+.1f} %)"
    if entry["best_equal"] is not None:
        decided = {True: "yes", False: "no",
                   None: f"not decided: {entry.get('within_tolerance_reason')}"}
        interval = entry.get("vs_best_equal_interval")
        spread = ("" if not interval else
                  f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}] %")
        line += (f"\n    auto vs best equal-S ({entry['best_equal']}, "
                 f"{entry['best_equal_step_time']:.3f} s): {100 * entry['vs_best_equal']:+.1f} %"
                 f"{spread} per round (within {100 * AUTO_TOLERANCE:.0f} %: "
                 f"{decided[entry['within_tolerance']]})")
    if entry.get("equal_flops") is not None:
        line += (f"\n    auto vs Seq1F1B's equal-flops split of the same S "
                 f"({entry['equal_flops']}, slices {entry['equal_flops_slices']}, "
                 f"{entry['equal_flops_step_time']:.3f} s): "
                 f"{100 * entry['vs_equal_flops']:+.1f} % ({entry['vs_equal_flops_verdict']})")
    elif entry["token_slices"]:
        line += (f"\n    no equal-flops row at S={len(entry['token_slices'])} "
                 f"(--equal-flops-slices {len(entry['token_slices'])} adds one)")
    return line


def speedup_interval(row: dict) -> str:
    """The per-round speedup's interval the row's verdict judged, with the spiked rounds set
    aside counted (so an interval narrower than the rounds' is never silent)."""
    if row.get("speedup_low") is None:
        return "-"
    text = f"{row['speedup_low']:.2f}-{row['speedup_high']:.2f}x"
    coverage = row.get("speedup_confidence")
    if coverage is not None and coverage < CONFIDENCE:
        text += f" (only {100 * coverage:.0f} %)"
    aside = row.get("rounds_set_aside") or 0
    return text + (f" ({aside} of {len(row['step_times'] or [])} set aside)" if aside else "")


def _ratio(row: dict) -> str:
    if row["baseline"]:
        return "baseline"
    if row["attention"] != "sdpa":
        return f"{row['speedup']:.2f}x (kernel difference)"
    return f"{row['speedup']:.2f}x {row['verdict']}"


def format_summary(summary: dict) -> str:
    lines = [f"M = {summary['num_microbatches']} (ratios against {summary['baseline']}, the "
             "same attention kernel as the token pipeline)",
             f"  {'schedule':34s} {'attention':9s} {'step s (median)':>15s} "
             f"{'vs same-kernel stock':>24s} {'per-round 90 % interval':>28s}"]
    for r in summary["rows"]:
        lines.append(f"  {r['schedule']:34s} {r['attention']:9s} {r['step_time']:15.3f} "
                     f"{_ratio(r):>24s} {speedup_interval(r):>28s}")
    if summary["best"] is not None:
        low, high = summary["best_interval"]
        verdict = {"faster": "faster", "slower": "SLOWER than the baseline",
                   "tie": "a tie (the interval holds 1, or the host is too noisy)"}.get(
                       summary["best_verdict"], summary["best_verdict"])
        target = summary["target"]
        decided = {True: "met", False: "NOT met",
                   None: f"not decided ({summary.get('undecided_reason')})"}
        against = summary.get("goal_against") or summary["baseline"]
        goal = ("" if target is None else
                f"; goal >= {target}x over {against}: {decided[summary['target_met']]}")
        aside = summary.get("best_rounds_set_aside") or 0
        judged = ((f"per-round speedup interval {low:.2f}-{high:.2f}x" if low is not None
                   else "no per-round speedup interval")
                  + (f", {aside} spiked round(s) set aside" if aside else ""))
        lines.append(f"  best: {summary['best']} ({judged}): "
                     f"{summary['best_speedup']:.2f}x, {verdict}{goal}")
    for entry in summary["auto"]:
        lines.append(format_auto(entry))
    if summary.get("host_note"):
        lines.append(f"  {summary['host_note']}")
    load = summary.get("load_average_1m")
    if load:
        lines.append(f"  load average (1 min) before / after the run: {load['before']:.2f} / "
                     f"{load['after']:.2f}")
    if summary.get("contention"):
        lines.append(f"  {contention_note(summary['contention'], summary['num_microbatches'])}")
    for note in summary["config"]["notes"]:
        lines.append(f"  note: {note}")
    if summary.get("cpu_allocator"):
        lines.append(f"  CPU allocator: {summary['cpu_allocator']}")
    if summary.get("gradient_accumulation_fusion") is not None:
        fused = "on" if summary["gradient_accumulation_fusion"] else "off"
        lines.append(f"  gradient-accumulation fusion: {fused} (every row)")
    for name, ratio in summary["kernel_difference"].items():
        lines.append(f"  kernel difference (not a schedule gain): {name} takes {ratio:.2f}x the "
                     "baseline's time")
    return "\n".join(lines)


def rejudge(path: str) -> int:
    """Print a saved run's tables with its verdicts and goals judged again from its rounds."""
    from megatron_terapipe.benchmark.compare import judged_fields

    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)["results"]
    for old in saved:
        base = next((r for r in old["rows"] if r["baseline"]), None)
        if base is None:
            raise SystemExit(f"--rejudge {path}: M = {old.get('num_microbatches')} has no "
                             "baseline row to judge against")
        rows = [{**r, **judged_fields(r["step_times"], base["step_times"], r["baseline"])}
                for r in old["rows"]]
        summary = summarise(rows, old["num_microbatches"])
        for key in ("config", "load_average_1m", "cpu_allocator", "gradient_accumulation_fusion",
                    "contention"):
            summary[key] = old.get(key)
        summary["config"] = summary["config"] or {"notes": []}
        print(format_summary(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_terapipe.benchmark.compare import run_comparison

    args = parse_args(argv)
    if args.rejudge:
        return rejudge(args.rejudge)
    summaries = []
    for count in args.microbatch_counts:
        spec = spec_for(args, count)
        comparison = run_comparison(spec, args.threads_per_rank, args.timeout)
        data = comparison.to_dict()
        summary = summarise(comparison.rows, count)
        summary["config"] = data["config"]
        summary["load_average_1m"] = data.get("load_average_1m")
        summary["cpu_allocator"] = data.get("cpu_allocator")
        summary["gradient_accumulation_fusion"] = data.get("gradient_accumulation_fusion")
        summary["contention"] = data.get("contention")
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
