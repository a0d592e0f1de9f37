"""terapipe-simulate: simulate one pipeline step of a schedule and report its timeline.

Examples:
  terapipe-simulate --schedule token-1f1b --pipeline-model-parallel-size 4 \\
      --num-microbatches 2 --num-token-slices 8 --cost-model uniform
  terapipe-simulate --schedule terapipe --pipeline-model-parallel-size 8 --num-microbatches 2 \\
      --token-slices 512,384,384,256,256,256 --seq-length 2048 --cost-model analytic \\
      --model gpt3-13b --json --trace step.json --plot step.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.flag_values import output_file_problem
from megatron_terapipe.schedules.generators import SCHEDULES, TOKEN_SCHEDULES, build_schedule
from megatron_terapipe.schedules.ir import Schedule
from megatron_terapipe.schedules.text import ScheduleTextError, parse_schedule
from megatron_terapipe.schedules.validator import ScheduleError, find_problems
from megatron_terapipe.simulate.costs import ActionCosts
from megatron_terapipe.simulate.simulator import P2P_MODES, SimulationResult, simulate
from megatron_terapipe.token_slices import equal_token_slices, validate_token_slices

INTERLEAVED_SCHEDULES = ("interleaved", "token-interleaved")
DEFAULT_TOKEN_SLICES = 4
DEFAULT_SEQ_LENGTH = 2048
# Generator error messages name parameters; the CLI user knows the flags.
_FLAG_NAMES = {
    "num_stages": "--pipeline-model-parallel-size",
    "num_microbatches": "--num-microbatches",
    "num_token_slices": "--num-token-slices",
    "num_chunks": "--virtual-pipeline-model-parallel-size",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="terapipe-simulate",
        description="Simulate one training step of a pipeline schedule on a cost model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
    )
    s = p.add_argument_group("schedule")
    s.add_argument(
        "--schedule", choices=list(SCHEDULES), default="terapipe", help="default terapipe"
    )
    s.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=4,
        metavar="P",
        help="pipeline stages (default 4)",
    )
    s.add_argument(
        "--num-microbatches",
        type=int,
        default=4,
        metavar="M",
        help="micro-batches per step (default 4)",
    )
    slices = s.add_mutually_exclusive_group()
    slices.add_argument(
        "--num-token-slices",
        type=int,
        metavar="S",
        help=f"equal slices (default {DEFAULT_TOKEN_SLICES} for token schedules, 1 for stock)",
    )
    slices.add_argument(
        "--token-slices", metavar="L1,L2,...", help="explicit slice lengths, summing to seq length"
    )
    s.add_argument(
        "--virtual-pipeline-model-parallel-size",
        type=int,
        metavar="V",
        help="model chunks per stage (default 2 for interleaved schedules, else 1)",
    )
    s.add_argument(
        "--seq-length", type=int, help=f"default {DEFAULT_SEQ_LENGTH}, or the sum of --token-slices"
    )
    s.add_argument("--print-schedule", action="store_true", help="print the per-stage actions")
    s.add_argument(
        "--schedule-file",
        metavar="FILE",
        help="a schedule of your own, one 'stage <rank>: <actions>' line per rank in the notation "
        "--print-schedule prints (computes alone get their P2P from the placement rule); its "
        "stages, micro-batches, slices and chunks replace --schedule, -P, -M and -V, and it is "
        "validated before it is simulated",
    )
    s.add_argument(
        "--split-backward",
        action="store_true",
        help="split each backward that sends a gradient into B and W (--token-pipeline-split-"
        "backward); W is priced at --weight-grad-share of the backward",
    )

    c = p.add_argument_group("cost model")
    c.add_argument(
        "--cost-model",
        choices=("uniform", "analytic"),
        default="uniform",
        help="uniform: forward 1, backward 2, free P2P; analytic: FLOP/byte model",
    )
    c.add_argument(
        "--p2p",
        choices=P2P_MODES,
        default="rendezvous",
        help="rendezvous: blocking sends (the executor's contract); eager: buffered",
    )
    c.add_argument(
        "--backward-ratio",
        type=float,
        default=2.0,
        help="backward time / forward time when splitting a stage model",
    )
    c.add_argument(
        "--weight-grad-share",
        type=float,
        default=None,
        help="with --split-backward: the weight-gradient share of a backward (default 0.5, "
        "Zero Bubble's B = W)",
    )
    m = p.add_argument_group("model (Megatron flag names; for --cost-model analytic)")
    m.add_argument("--model", help="preset dims from terapipe-plan, e.g. gpt3-13b")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--micro-batch-size", type=int, default=1)
    m.add_argument("--tensor-model-parallel-size", type=int, default=1)
    m.add_argument("--sequence-parallel", action="store_true")
    m.add_argument("--device-preset", help="v100, a100, h100 or cpu (default v100)")
    m.add_argument("--device-tflops", type=float, help="override the preset's peak TFLOP/s")
    m.add_argument("--efficiency", type=float, help="override the preset's FLOP efficiency")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    o.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    o.add_argument("--plot", metavar="FILE.png", help="write a Gantt chart (needs matplotlib)")
    return p


def _require_positive(parser: argparse.ArgumentParser, **flags: int | None) -> None:
    for flag, value in flags.items():
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def _check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ratios and rates that cannot be, and outputs that cannot be written: refused before the
    simulation runs (not after, when the trace or plot is written)."""
    for flag, value in (
        ("--backward-ratio", args.backward_ratio),
        ("--device-tflops", args.device_tflops),
        ("--efficiency", args.efficiency),
    ):
        if value is not None and not value > 0:
            parser.error(f"{flag}={value} must be > 0")
    if args.efficiency is not None and args.efficiency > 1:
        parser.error(f"--efficiency={args.efficiency} is a fraction of peak: 0 < e <= 1")
    for flag, path in (("--trace", args.trace), ("--plot", args.plot)):
        problem = path and output_file_problem(flag, path)
        if problem:
            parser.error(problem)


def _resolve_slices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, ...]:
    stock = args.schedule not in TOKEN_SCHEDULES
    if args.token_slices is not None:
        try:
            slices = [int(x) for x in args.token_slices.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--token-slices={args.token_slices!r}: expected integers like 512,512")
        seq = args.seq_length if args.seq_length is not None else sum(slices)
        try:
            return validate_token_slices(slices, seq, what="--token-slices")
        except ValueError as err:
            parser.error(str(err))
    seq = args.seq_length if args.seq_length is not None else DEFAULT_SEQ_LENGTH
    count = args.num_token_slices
    if count is None:
        count = 1 if stock else DEFAULT_TOKEN_SLICES
    try:
        return equal_token_slices(seq, count)
    except ValueError as err:
        parser.error(f"--num-token-slices={count} with --seq-length={seq}: {err}")


def _flagged(message: str) -> str:
    for name, flag in _FLAG_NAMES.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return message


def _analytic_costs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, num_chunks: int
) -> ActionCosts:
    try:
        from megatron_terapipe.slicing.cost_models import DEVICE_PRESETS, AnalyticCostModel
    except ImportError as err:  # the planner package is optional for the simulator
        parser.error(
            "--cost-model analytic needs megatron_terapipe.slicing.cost_models."
            f"AnalyticCostModel, which failed to import ({err}); use --cost-model uniform"
        )
    dims = _model_dims(parser, args)
    preset = args.device_preset or "v100"
    if preset not in DEVICE_PRESETS:
        parser.error(
            f"--device-preset={preset!r} is unknown; valid choices: "
            + ", ".join(sorted(DEVICE_PRESETS))
        )
    P = args.pipeline_model_parallel_size
    if dims["num_layers"] < P * num_chunks:
        parser.error(
            f"--num-layers={dims['num_layers']} cannot fill {P * num_chunks} virtual stages "
            f"(--pipeline-model-parallel-size={P} x {num_chunks} chunks)"
        )
    try:
        model = AnalyticCostModel.from_preset(
            preset,
            **dims,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=P,
            sequence_parallel=args.sequence_parallel,
        )
        rates = {}
        if args.device_tflops is not None:
            rates["peak_tflops"] = args.device_tflops
        if args.efficiency is not None:
            rates["efficiency"] = args.efficiency
        if rates:
            model = model.with_rates(**rates)  # dataclasses.replace re-runs the checks
    except ValueError as err:
        parser.error(str(err))
    return ActionCosts.from_stage_cost_model(
        model,
        batch=args.micro_batch_size,
        backward_ratio=args.backward_ratio,
        num_chunks=num_chunks,
        memory=_memory_model(dims, args, num_chunks),
    )


def _model_dims(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, int]:
    dims = {"num_layers": None, "hidden_size": None, "num_attention_heads": None}
    if args.model:
        from megatron_terapipe.flag_values import MODELS

        if args.model not in MODELS:
            parser.error(f"--model={args.model!r} is unknown; valid choices: {', '.join(MODELS)}")
        layers, hidden, heads, _seq = MODELS[args.model]
        dims.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    for key in dims:
        if getattr(args, key) is not None:
            dims[key] = getattr(args, key)
    missing = [f"--{k.replace('_', '-')}" for k, v in dims.items() if v is None]
    if missing:
        parser.error(f"--cost-model analytic needs {', '.join(missing)} (or --model)")
    _require_positive(parser, **dims)
    return dims


def _memory_model(dims: dict[str, int], args: argparse.Namespace, num_chunks: int) -> Any:
    from megatron_terapipe.slicing.memory import ActivationMemoryModel

    return ActivationMemoryModel(
        **dims,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_chunks=num_chunks,
        sequence_parallel=args.sequence_parallel,
    )


def format_table(result: SimulationResult) -> str:
    unit = result.timeline.time_unit
    slices = result.token_slices
    shown = ",".join(map(str, slices)) if len(slices) <= 8 else f"{len(slices)} slices"
    lines = [
        f"schedule {result.schedule}: P={result.num_stages} M={result.num_microbatches} "
        f"S={len(slices)} [{shown}] V={result.num_chunks}  cost model {result.cost_model}, "
        f"p2p {result.p2p}",
        f"step time {result.step_time:.6g} {unit}   mean bubble {result.mean_bubble_fraction:.2%}",
        "",
        f"{'stage':>5}  {'busy':>12}  {'bubble':>8}  {'peak acts':>9}  {'peak act bytes':>14}",
    ]
    for p in range(result.num_stages):
        nbytes = "-"
        if result.peak_activation_bytes is not None:
            nbytes = f"{result.peak_activation_bytes[p] / 2**20:.1f} MiB"
        lines.append(
            f"{p:>5}  {result.busy_time[p]:>12.6g}  {result.bubble_fraction[p]:>8.2%}  "
            f"{result.peak_activations[p]:>9}  {nbytes:>14}"
        )
    return "\n".join(lines)


def _schedule_from_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Schedule:
    """The user's schedule, refused with the validator's problems when it would not run; the
    flags that describe its shape take the file's values."""
    try:
        with open(args.schedule_file, encoding="utf-8") as handle:
            schedule = parse_schedule(handle.read())
    except OSError as err:
        parser.error(f"--schedule-file {args.schedule_file}: {err.strerror}")
    except ScheduleTextError as err:
        parser.error(f"--schedule-file {args.schedule_file}: {err}")
    problems = find_problems(schedule)
    if problems:
        parser.error(f"--schedule-file {args.schedule_file} is not a valid schedule:\n  "
                     + "\n  ".join(problems))
    args.schedule = schedule.name
    args.pipeline_model_parallel_size = schedule.num_stages
    args.num_microbatches = schedule.num_microbatches
    args.virtual_pipeline_model_parallel_size = schedule.num_chunks
    args.split_backward = schedule.split_backward
    if args.token_slices is None and args.num_token_slices is None:
        args.num_token_slices = schedule.num_token_slices
    return schedule


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_values(parser, args)
    _require_positive(
        parser,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_microbatches=args.num_microbatches,
        num_token_slices=args.num_token_slices,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
    )
    num_chunks = args.virtual_pipeline_model_parallel_size
    if num_chunks is None:
        num_chunks = 2 if args.schedule in INTERLEAVED_SCHEDULES else 1
    if args.schedule_file:
        schedule = _schedule_from_file(parser, args)
        num_chunks = schedule.num_chunks
        slices = _resolve_slices(parser, args)
        if len(slices) != schedule.num_token_slices:
            parser.error(f"--schedule-file {args.schedule_file} has {schedule.num_token_slices} "
                         f"token slices, but {len(slices)} slice lengths were given")
    else:
        slices = _resolve_slices(parser, args)
        try:
            schedule = build_schedule(
                args.schedule,
                args.pipeline_model_parallel_size,
                args.num_microbatches,
                len(slices),
                num_chunks,
                split_backward=args.split_backward,
            )
        except ValueError as err:
            parser.error(_flagged(str(err)))
        problems = find_problems(schedule)
        if problems:  # a generator bug: report it as such rather than as a usage error
            raise ScheduleError(schedule.name, problems)

    share = 0.5 if args.weight_grad_share is None else args.weight_grad_share
    if args.weight_grad_share is not None and not args.split_backward:
        parser.error("--weight-grad-share prices split backwards; add --split-backward")
    if not 0.0 <= share <= 1.0:
        parser.error(f"--weight-grad-share={share} must be in [0, 1]")
    if args.cost_model == "uniform":
        costs = ActionCosts.uniform()
    else:
        costs = _analytic_costs(parser, args, num_chunks)
    costs.weight_grad_share = share
    result = simulate(schedule, slices, costs, p2p=args.p2p)

    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as f:
            json.dump(result.timeline.to_chrome_trace(), f)
    if args.plot:
        from megatron_terapipe.simulate.plot import plot_timelines

        plot_timelines([result.timeline], args.plot, title=f"terapipe-simulate: {schedule.name}")

    if args.print_schedule and not args.json:
        print(schedule)
        print()
    if args.json:
        out: dict[str, Any] = result.to_dict()
        out.update(valid=True, seq_length=sum(slices), trace=args.trace, plot=args.plot)
        print(json.dumps(out))
    else:
        print(format_table(result))
        for what, path in (("trace", args.trace), ("plot", args.plot)):
            if path:
                print(f"wrote {what} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
