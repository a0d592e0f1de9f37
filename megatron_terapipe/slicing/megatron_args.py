"""The planner behind Megatron's --token-pipeline-* flags (the flags themselves: arguments.py).

`--token-pipeline-slices` takes N (equal slices), `auto` (the DP) or l1,l2,... (explicit).
Under `auto` the plan is for what the executor runs: `num_microbatches` micro-batches of
`micro_batch_size` sequences, each one batch slice, one token slicing for all (the batch DP's
advice on the micro-batch size is the CLI's job). Planning is deterministic but may profile
the device, so rank 0 plans and broadcasts (`plan_and_broadcast`).

The flag values are parsed and checked by `token_slices` and `flag_values`, the same functions
the argument check calls, so a value the arguments accept means the same thing here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.flag_values import num_microbatches as _num_microbatches
from megatron_terapipe.flag_values import parse_cost_model, slice_multiple
from megatron_terapipe.slicing.cost_models import AnalyticCostModel
from megatron_terapipe.slicing.latency_table import LatencyTableCostModel
from megatron_terapipe.slicing.memory import GIB, ActivationMemoryModel, memory_model_problem
from megatron_terapipe.slicing.plan import SlicingPlan, format_plan
from megatron_terapipe.slicing.planner import (
    check_granularity,
    default_granularity,
    make_plan,
    predict_step_time,
)
from megatron_terapipe.slicing.strategies import simulator_scorer
from megatron_terapipe.token_slices import (
    SLICES_FLAG,
    equal_token_slices,
    parse_token_slices,
    validate_token_slices,
)


def parse_token_pipeline_slices(value: Any) -> tuple[str, Any]:
    """('auto', None) | ('count', N) | ('list', (l1, ...)) from the flag's value
    (`token_slices.parse_token_slices`'s grammar); a count below 1 is a ValueError."""
    parsed = parse_token_slices(value)
    if parsed == "auto":
        return "auto", None
    if isinstance(parsed, tuple):
        return "list", parsed
    if parsed < 1:
        raise ValueError(f"{SLICES_FLAG}={parsed}: the number of slices must be >= 1")
    return "count", parsed


def cost_model_from_args(args: Any) -> Any:
    """`--token-pipeline-cost-model`: profile (default), analytic[:preset], or a file path
    (.json profile from the profiler, .npz latency table).

    profile times this stage's real layers on this device at start-up (startup_profile: one
    layer scaled to the stage, a few seconds for the CPU benchmark model), because the DP's
    trade-off - pipeline bubble against each slice's fixed cost - is only as right as those
    costs, and a data sheet does not know them. It runs one TP shard on one rank, so under
    tensor parallelism the default falls back to the analytic model (noted in the plan).
    """
    kind, detail = parse_cost_model(getattr(args, "token_pipeline_cost_model", None))
    if kind == "analytic":
        return AnalyticCostModel.from_args(args, preset=detail)
    if kind == "profile":
        tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
        if tp > 1:
            model = AnalyticCostModel.from_args(args)
            model.note = (f"--token-pipeline-cost-model profile times one rank, not a TP = {tp} "
                          f"group: planned with {model.name}; for measured costs profile "
                          "beforehand (terapipe-plan --cost-model profile --profile-out "
                          "FILE.json) and pass FILE.json")
            return model
        from megatron_terapipe.slicing.profiler import startup_profile

        return startup_profile(args, _granularity(args))
    if kind == "latency-table":
        return LatencyTableCostModel.load(detail)
    from megatron_terapipe.slicing.profiled import ProfiledCostModel

    return ProfiledCostModel.load(detail)


def _granularity(args: Any) -> int:
    g = getattr(args, "token_pipeline_granularity", None)
    if not g:
        return default_granularity(args.seq_length, slice_multiple(args))
    return check_granularity(g, args.seq_length, slice_multiple(args),
                             flag="--token-pipeline-granularity", seq_flag="--seq-length",
                             multiple_flag="--tensor-model-parallel-size")


def plan_from_args(
    args: Any, *, cost_model: Any = None, num_microbatches: int | None = None
) -> SlicingPlan:
    """The plan for a Megatron argument namespace (see the module docstring)."""
    seq, mbs = int(args.seq_length), int(getattr(args, "micro_batch_size", 1) or 1)
    stages = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    multiple_of = slice_multiple(args)
    g = _granularity(args)
    mode, value = parse_token_pipeline_slices(getattr(args, "token_pipeline_slices", None))
    schedule = getattr(args, "token_pipeline_schedule", None) or "terapipe"
    chunks = int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1)
    micro = num_microbatches or _num_microbatches(args) or 1
    cap = getattr(args, "token_pipeline_memory_cap", None)
    cost = cost_model if cost_model is not None else cost_model_from_args(args)
    problem = memory_model_problem(args)
    if problem is not None and cap is not None:
        raise ValueError(f"--token-pipeline-memory-cap cannot be checked: {problem}")
    memory = None if problem is not None else ActivationMemoryModel.from_args(args)
    split_backward = bool(getattr(args, "token_pipeline_split_backward", False))
    score, note = _score_for(schedule, split_backward)
    common = dict(seq_length=seq, num_stages=stages, batch=mbs, batch_mode="fixed",
                  num_microbatches=micro, memory=memory, schedule=schedule, num_chunks=chunks,
                  score=score, flops_model=AnalyticCostModel.from_args(args, preset="cpu"),
                  split_backward=split_backward)
    if mode == "auto":
        # Few simulations: planning runs at start-up while every other rank waits.
        plan = make_plan(cost, granularity=g, multiple_of=multiple_of, strategy="dp",
                         memory_cap_gib=cap, simulator_candidates=8, **common)
        plan = _prefer_equal(plan, cost, seq, g, cap, **common)
    else:
        if mode == "count":
            slices = equal_token_slices(seq, value, multiple_of)
        else:
            slices = validate_token_slices(value, seq, multiple_of, SLICES_FLAG)
        plan = _fixed_plan(cost, slices, "equal" if mode == "count" else "explicit",
                           cap, **common)
    if note:
        plan.extra["score_note"] = note
    if common["split_backward"] and common["score"] == "simulator":
        plan.extra["split_backward"] = True  # scored as the split schedule
    if getattr(cost, "note", None):
        plan.extra["cost_model_note"] = cost.note
    if hasattr(cost, "r2"):
        plan.extra.update(profile_r2=round(cost.r2, 4),
                          profile_r2_context=round(cost.r2_context, 4))
    if "profile_seconds" in getattr(cost, "meta", {}):
        plan.extra["profile_seconds"] = cost.meta["profile_seconds"]
    plan.extra["num_microbatches"] = micro
    return plan


# The DP's uneven slicing must beat the best equal one by more than this predicted fraction to be
# chosen: a measured cost model is least certain between its grid points, where uneven slices
# fall, and equal slices are what a user would compare against.
EQUAL_PREFERENCE = 0.03


def _prefer_equal(plan: SlicingPlan, cost: Any, seq: int, g: int, cap: float | None,
                  **common: Any) -> SlicingPlan:
    """The best equal slicing (up to ALWAYS_SIMULATED_EQUAL slices, same score, within the
    memory cap) instead of the DP's plan when it is predicted within EQUAL_PREFERENCE of it."""
    from megatron_terapipe.slicing.planner import ALWAYS_SIMULATED_EQUAL

    best = None
    for n in range(1, min(ALWAYS_SIMULATED_EQUAL, seq // g) + 1):
        try:
            candidate = _fixed_plan(cost, equal_token_slices(seq, n, g), "equal", cap, **common)
        except ValueError:  # over the memory cap
            continue
        if best is None or candidate.predicted_step_time < best.predicted_step_time:
            best = candidate
    if best is None or best.token_slices == plan.token_slices or (
            best.predicted_step_time > plan.predicted_step_time * (1 + EQUAL_PREFERENCE)):
        return plan
    best.strategy = "dp, equal preferred"
    best.extra.update(
        granularity=g,
        dp_token_slices=list(plan.token_slices),
        dp_predicted_step_time=plan.predicted_step_time,
        dp_objective=plan.objective,
        equal_preference=f"equal slices predicted within {EQUAL_PREFERENCE:.0%} of the DP's plan",
    )
    return best


def _score_for(schedule: str, split_backward: bool = False) -> tuple[str, str]:
    """TeraPipe's formula is exact for its own (unsplit) schedule only; others, and split
    backwards, need the simulator."""
    if schedule == "terapipe" and not split_backward:
        return "formula", ""
    try:
        import megatron_terapipe.schedules  # noqa: F401
        from megatron_terapipe.schedules import build_schedule  # noqa: F401
        from megatron_terapipe.simulate import ActionCosts, simulate  # noqa: F401
    except ImportError as exc:
        return "formula", f"simulator unavailable ({exc}); scored with TeraPipe's formula"
    return "simulator", ""


def _fixed_plan(cost: Any, slices: Sequence[int], strategy: str, cap: float | None,
                **common: Any) -> SlicingPlan:
    """A user-chosen slicing with its predicted time; it must fit the memory cap too."""
    stages, mbs, micro = common["num_stages"], common["batch"], common["num_microbatches"]
    batch_slices = (mbs,) * micro
    memory: ActivationMemoryModel | None = common["memory"]
    peak = math.nan if memory is None else memory.peak_bytes(
        common["schedule"], batch_slices, (tuple(slices),) * micro, stages,
        split_backward=common["split_backward"])
    if cap is not None and peak > cap * GIB:
        raise ValueError(
            f"{SLICES_FLAG} {list(slices)} needs {peak / GIB:.3f} GiB of activations per stage, "
            f"over --token-pipeline-memory-cap={cap:g} GiB; choose other slices (under "
            "terapipe a thin last slice costs the most; under 1F1B orders fewer in flight "
            "cost less) or 'auto', which plans within the cap"
        )
    objective, t_max = predict_step_time(cost, tuple(slices), stages, batch_slices)
    extra: dict[str, Any] = {"schedule": common["schedule"], "score": "formula",
                             "num_stages": stages}
    if memory is not None:
        extra["activation_memory_gib"] = round(peak / GIB, 4)
    simulated = math.nan
    if common["score"] == "simulator":
        scorer = simulator_scorer(cost, common["schedule"], stages, micro, mbs,
                                  common["num_chunks"], split_backward=common["split_backward"],
                                  flops_model=common["flops_model"])
        extra.update(score="simulator")
        simulated = scorer(tuple(slices))
    step = objective if math.isnan(simulated) else simulated
    return SlicingPlan(tuple(slices), batch_slices, step, t_max, strategy,
                       getattr(cost, "name", type(cost).__name__), extra,
                       objective=objective, simulated_step_time=simulated)


def broadcast_plan(plan: SlicingPlan | None, group: Any = None) -> SlicingPlan:
    """Rank 0's plan on every rank (of `group`); without torch.distributed, `plan` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if plan is None:
            raise ValueError("broadcast_plan: no plan, and torch.distributed is not initialized")
        return plan
    src = 0 if group is None else dist.get_global_rank(group, 0)
    payload = [plan.to_dict() if dist.get_rank() == src and plan is not None else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    if payload[0] is None:
        raise ValueError(f"broadcast_plan: rank {src} had no plan to send")
    if "error" in payload[0]:
        raise ValueError(payload[0]["error"])
    return SlicingPlan.from_dict(payload[0])


def plan_and_broadcast(args: Any, group: Any = None, print_fn: Any = print) -> SlicingPlan:
    """Start-up hook: rank 0 plans (printing the plan), every rank gets the same plan.

    An error on rank 0 reaches every rank as the same ValueError instead of a hang.
    """
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        plan = plan_from_args(args)
        print_fn(format_plan(plan))
        return plan
    src = 0 if group is None else dist.get_global_rank(group, 0)
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == src:
        try:
            plan = plan_from_args(args)
            print_fn(format_plan(plan))
            payload = [plan.to_dict()]
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of any failure
            failure = exc
            payload = [{"error": str(exc), "type": type(exc).__name__}]
    dist.broadcast_object_list(payload, src=src, group=group)
    if failure is not None:
        raise failure
    if "error" in payload[0]:
        if payload[0].get("type") == "ValueError":
            raise ValueError(payload[0]["error"])
        raise RuntimeError(f"rank {src} failed to plan the token slices: "
                           f"{payload[0]['type']}: {payload[0]['error']}")
    return SlicingPlan.from_dict(payload[0])
