"""terapipe-plan: TeraPipe's DP planner from the command line (docs/latency_table.md for tables).

Examples:
  terapipe-plan --model gpt3-175b --tensor-model-parallel-size 8 \\
      --pipeline-model-parallel-size 48 --batch-size 2 --granularity 8 --json
  terapipe-plan --latency-table measured.npz --pipeline-model-parallel-size 4 --json
  terapipe-plan --model tiny --pipeline-model-parallel-size 2 --cost-model profile \\
      --profile-out tiny.json          # measure this device once, then --cost-model tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.flag_values import MODELS, output_file_problem
from megatron_terapipe.slicing.cost_models import DEVICE_PRESETS, AnalyticCostModel
from megatron_terapipe.slicing.latency_table import LatencyTableCostModel
from megatron_terapipe.slicing.memory import ActivationMemoryModel
from megatron_terapipe.slicing.plan import format_plan
from megatron_terapipe.slicing.planner import SCORES, STRATEGIES, check_granularity, make_plan

SCHEDULES = ("terapipe", "token-1f1b", "token-interleaved")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="terapipe-plan",
        description="Plan token (and batch) slices for TeraPipe token-level pipelining.",
    )
    m = p.add_argument_group("model (Megatron flag names)")
    m.add_argument("--model", choices=sorted(MODELS), help="preset dims (flags below override)")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--num-query-groups", type=int)
    m.add_argument("--ffn-hidden-size", type=int)
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--seq-length", type=int)
    par = p.add_argument_group("parallelism and batch")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="pipeline stages K")
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int,
                     help="sequences per pipeline to split into batch slices (default 1; with "
                     "--latency-table, the table's B)")
    par.add_argument("--batch-mode", choices=("free", "uniform", "fixed"), default="free",
                     help="free: any batch slices (TeraPipe); uniform: equal ones; fixed: "
                     "--num-microbatches micro-batches of --batch-size")
    par.add_argument("--num-microbatches", type=int, default=1)
    c = p.add_argument_group("cost model")
    c.add_argument("--cost-model", "--token-pipeline-cost-model", dest="cost_model",
                   default="analytic",
                   help="analytic[:PRESET], profile (measure this device), or a .json profile "
                   "/ .npz latency table")
    c.add_argument("--latency-table", metavar="FILE.npz",
                   help="measured table; format in docs/latency_table.md")
    c.add_argument("--device-preset", choices=sorted(DEVICE_PRESETS),
                   help="device of the analytic model (default v100, the paper's)")
    c.add_argument("--efficiency", type=float, help="override the preset's FLOP efficiency")
    c.add_argument("--no-p2p", action="store_true", help="leave P2P time out of the table")
    c.add_argument("--profile-out", metavar="FILE.json", help="save the measured profile")
    c.add_argument("--profile-repeats", type=int, default=5,
                   help="passes over the profile grid (random order); each point keeps "
                   "its least time")
    c.add_argument("--write-table", metavar="FILE.npz",
                   help="also save the cost model as a latency table at the granularity")
    pl = p.add_argument_group("planner")
    pl.add_argument("--granularity", "--token-pipeline-granularity", dest="granularity",
                    type=int, help="slices are multiples of this many tokens")
    pl.add_argument("--memory-cap", "--token-pipeline-memory-cap", dest="memory_cap",
                    type=float, metavar="GIB", help="activation memory per stage")
    pl.add_argument("--strategy", choices=STRATEGIES, default="dp")
    pl.add_argument("--num-slices", type=int, help="slice count for equal / equal-flops")
    pl.add_argument("--schedule", choices=SCHEDULES, default="terapipe")
    pl.add_argument("--num-chunks", type=int, default=1, help="virtual stages per rank")
    pl.add_argument("--score", choices=SCORES, default="formula",
                    help="rank plans by TeraPipe's objective (formula) or by the schedule "
                    "simulator's step time; either way the plan prints its own 'objective' and, "
                    "when simulated, 'simulated_step_time'")
    pl.add_argument("--method", choices=("bisect", "ascending"), default="bisect",
                    help="t_max enumeration: pruned bisection (default) or TeraPipe's sweep")
    pl.add_argument("--compare", action="store_true",
                    help="also report the equal and equal-flops strategies")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


# Flags that count something: 0 or less is never meaningful (and would otherwise fall back to a
# preset's value or produce an empty plan).
_POSITIVE_INTS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "seq_length", "tensor_model_parallel_size", "pipeline_model_parallel_size", "batch_size",
    "num_microbatches", "profile_repeats", "granularity", "num_slices", "num_chunks",
)
_POSITIVE_FLOATS = ("efficiency", "memory_cap")
_OUTPUT_FILES = ("profile_out", "write_table")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _table_problem(flag: str, path: str) -> str | None:
    if not os.path.isfile(path):
        return f"{flag} {path}: no such file"
    if not zipfile.is_zipfile(path):
        return (
            f"{flag} {path} is not an .npz latency table (a numpy.savez archive; format in "
            "docs/latency_table.md)"
        )
    return None


def check_values(args: argparse.Namespace) -> None:
    """ValueError naming the first impossible flag value, before any planning or profiling."""
    for dest in _POSITIVE_INTS:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(dest)}={value} must be >= 1")
    for dest in _POSITIVE_FLOATS:
        value = getattr(args, dest)
        if value is not None and not value > 0:
            raise ValueError(f"{_flag(dest)}={value} must be > 0")
    if args.efficiency is not None and args.efficiency > 1:
        raise ValueError(f"--efficiency={args.efficiency} is a fraction of peak: 0 < e <= 1")
    tables = [("--latency-table", args.latency_table)]
    if args.cost_model.endswith(".npz"):
        tables.append(("--cost-model", args.cost_model))
    for flag, path in tables:
        problem = path and _table_problem(flag, path)
        if problem:
            raise ValueError(problem)
    if args.cost_model.endswith(".json") and not os.path.isfile(args.cost_model):
        raise ValueError(f"--cost-model {args.cost_model}: no such file")
    for dest in _OUTPUT_FILES:
        path = getattr(args, dest)
        problem = path and output_file_problem(_flag(dest), path)
        if problem:
            raise ValueError(problem)


def _dims(args: argparse.Namespace) -> dict[str, Any] | None:
    preset = MODELS.get(args.model) if args.model else None
    values = {
        "num_layers": args.num_layers or (preset[0] if preset else None),
        "hidden_size": args.hidden_size or (preset[1] if preset else None),
        "num_attention_heads": args.num_attention_heads or (preset[2] if preset else None),
    }
    if args.seq_length is None and preset:
        args.seq_length = preset[3]
    if all(values.values()):
        return values
    if any(values.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in values.items() if not v]
        raise ValueError(f"model flags incomplete: give {', '.join(missing)} (or --model)")
    return None


def _cost_model(args: argparse.Namespace, dims: dict[str, Any] | None) -> Any:
    if args.latency_table:
        table = LatencyTableCostModel.load(args.latency_table)
        if args.seq_length is not None and args.seq_length != table.seq_length:
            raise ValueError(
                f"--seq-length={args.seq_length} disagrees with the latency table's "
                f"seq_length={table.seq_length}"
            )
        args.seq_length = table.seq_length
        if args.batch_size is None:
            args.batch_size = table.max_batch
        return table
    spec = args.cost_model
    if spec.endswith(".npz"):
        args.latency_table = spec
        return _cost_model(args, dims)
    if spec.endswith(".json"):
        from megatron_terapipe.slicing.profiled import ProfiledCostModel

        return ProfiledCostModel.load(spec)
    if dims is None:
        raise ValueError(
            "no cost model: give model flags (--model, or --num-layers, --hidden-size, "
            "--num-attention-heads, --seq-length) or --latency-table FILE.npz"
        )
    if args.seq_length is None:
        raise ValueError("--seq-length is required with model flags")
    full = dict(dims, num_query_groups=args.num_query_groups,
                ffn_hidden_size=args.ffn_hidden_size,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    if spec == "profile":
        return _profile(args, full)
    if spec != "analytic" and not spec.startswith("analytic:"):
        raise ValueError(
            f"--cost-model={spec!r}: expected analytic[:PRESET], profile, FILE.json or FILE.npz"
        )
    preset = spec.split(":", 1)[1] if ":" in spec else (args.device_preset or "v100")
    model = AnalyticCostModel.from_preset(
        preset, **full, sequence_parallel=args.sequence_parallel,
        gated_linear_unit=args.swiglu,
    )
    if args.efficiency is not None:
        model = model.with_rates(efficiency=args.efficiency)
    return model


def _profile(args: argparse.Namespace, dims: dict[str, Any]) -> Any:
    from megatron_terapipe.slicing.planner import default_granularity
    from megatron_terapipe.slicing.profiler import (
        datasheet_p2p,
        default_grid,
        measure_fn_for_megatron_stage,
        profile_stage,
    )

    multiple = args.tensor_model_parallel_size if args.sequence_parallel else 1
    g = args.granularity or default_granularity(args.seq_length, multiple)
    measure = measure_fn_for_megatron_stage(**dims)
    grid = default_grid(args.seq_length, args.batch_size or 1, g)
    p2p = datasheet_p2p(dims["hidden_size"], AnalyticCostModel.bytes_per_element,
                        args.device_preset or "cpu")
    meta = {"dims": measure.dims, "device": measure.device, "clock": measure.clock}
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    profile = profile_stage(measure, grid, repeats=args.profile_repeats, meta=meta, p2p=p2p,
                            log=log)
    if args.profile_out:
        profile.save(args.profile_out)
        profile.source = args.profile_out
    return profile


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, plan, and return what main prints (the plan as a dict)."""
    args = build_parser().parse_args(argv)
    check_values(args)
    dims = _dims(args)
    cost = _cost_model(args, dims)
    if args.seq_length is None:
        raise ValueError("--seq-length is required (or --model / --latency-table)")
    batch = args.batch_size or 1
    multiple = args.tensor_model_parallel_size if args.sequence_parallel else 1
    if args.granularity is not None:
        check_granularity(args.granularity, args.seq_length, multiple, flag="--granularity")
    memory = flops = None
    if dims is not None:
        par = dict(num_query_groups=args.num_query_groups,
                   tensor_model_parallel_size=args.tensor_model_parallel_size,
                   pipeline_model_parallel_size=args.pipeline_model_parallel_size)
        memory = ActivationMemoryModel(**dims, **par, sequence_parallel=args.sequence_parallel,
                                       num_chunks=args.num_chunks,
                                       ffn_hidden_size=args.ffn_hidden_size,
                                       gated_linear_unit=args.swiglu)
        flops = AnalyticCostModel(**dims, **par, ffn_hidden_size=args.ffn_hidden_size,
                                  gated_linear_unit=args.swiglu)
    if args.memory_cap is not None and memory is None:
        raise ValueError("--memory-cap needs model flags (the memory model needs the dims)")
    common = dict(
        seq_length=args.seq_length, num_stages=args.pipeline_model_parallel_size,
        batch=batch, granularity=args.granularity, multiple_of=multiple,
        batch_mode=args.batch_mode, num_microbatches=args.num_microbatches, memory=memory,
        memory_cap_gib=args.memory_cap, schedule=args.schedule, score=args.score,
        num_chunks=args.num_chunks, include_p2p=not args.no_p2p, flops_model=flops,
        method=args.method,
    )
    plan = make_plan(cost, strategy=args.strategy, num_slices=args.num_slices, **common)
    result = plan.to_dict()
    if hasattr(cost, "r2"):
        result["extra"].update(profile_r2=cost.r2, profile_r2_context=cost.r2_context)
        plan.extra.update(profile_r2=cost.r2, profile_r2_context=cost.r2_context)
    if args.write_table:
        g = plan.extra["granularity"]
        LatencyTableCostModel.from_cost_model(cost, batch, args.seq_length, g).save(
            args.write_table)
    if args.compare:
        result["compare"] = {}
        for strategy in STRATEGIES:
            if strategy == args.strategy:
                continue
            try:
                other = make_plan(cost, strategy=strategy, num_slices=args.num_slices, **common)
            except ValueError as exc:
                result["compare"][strategy] = {"error": str(exc)}
                continue
            result["compare"][strategy] = {
                "token_slices": list(other.token_slices),
                "predicted_step_time": other.predicted_step_time,
                "objective": other.objective,
                "t_max": other.t_max,
            }
            if other.simulated:
                result["compare"][strategy]["simulated_step_time"] = other.simulated_step_time
    result["_text"] = format_plan(plan)
    result["_json"] = args.json
    return result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = run(argv)
    except ValueError as exc:
        print(f"terapipe-plan: error: {exc}", file=sys.stderr)
        return 2
    text, wants_json = result.pop("_text"), result.pop("_json")
    if wants_json:
        print(json.dumps(result))
    else:
        print(text)
        for name, other in result.get("compare", {}).items():
            if "error" in other:
                print(f"  {name}: {other['error']}")
            else:
                simulated = other.get("simulated_step_time")
                shown = "" if simulated is None else f", simulated_step_time {simulated:.6g} s"
                print(f"  {name}: predicted_step_time {other['predicted_step_time']:.6g} s, "
                      f"objective {other['objective']:.6g} s{shown} "
                      f"with {len(other['token_slices'])} slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
