"""Planned token slices for a benchmark variant, two ways.

- `auto_plan`: what `--token-pipeline-slices auto` gives a user - the product's start-up path
  (`slicing.plan_and_broadcast` on the benchmark's pretrain_gpt.py arguments, default cost model).
  This is the row that says whether the planner finds the fast slicing by itself.
- `plan_slices` ("DP-planned"): the same DP on a cost model fitted to the warm-up round's own
  timelines - what the DP would choose if it knew this run's costs.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_terapipe.benchmark.fit import P2PFit, fit_cost_model
from megatron_terapipe.benchmark.spec import BenchSpec, Variant


def _gather(records: list) -> list[list]:
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return gathered


def auto_plan(spec: BenchSpec, variant: Variant) -> dict[str, Any]:
    """The product's plan (as a dict) for `variant`'s schedule; collective: every rank calls it
    and gets rank 0's plan. Its `predicted_step_time` is the planner's own prediction."""
    import copy
    import time

    from megatron_terapipe.slicing import plan_and_broadcast

    args = copy.copy(spec.model)
    args.token_pipeline = True
    args.token_pipeline_schedule = variant.schedule
    args.token_pipeline_slices = "auto"
    args.token_pipeline_split_backward = variant.split_backward
    started = time.perf_counter()
    plan = plan_and_broadcast(args, print_fn=lambda line: None).to_dict()
    plan["planning_seconds"] = time.perf_counter() - started  # this rank's wait, rank 0's work
    return plan


def plan_slices(
    spec: BenchSpec,
    variant: Variant,
    warm: dict[str, tuple[tuple[int, ...], list]],
    p2p: P2PFit,
) -> dict[str, Any]:
    """The plan (a dict) for `variant`; every rank takes part (collectives) and gets rank 0's
    answer.

    `warm` maps a name to (token_slices, this rank's records); it should hold a step with
    varied slice lengths (harness.calibration_slices) besides any equal-slice warm-ups.
    """
    from megatron_terapipe.slicing.planner import make_plan

    runs = [(slices, _gather(records)) for _, (slices, records) in sorted(warm.items())]
    cost = fit_cost_model(runs, spec.pipeline_parallel, spec.model.hidden_size, p2p)
    answer: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        score = "formula"
        if (variant.schedule != "terapipe" or variant.split_backward) and _simulator_available():
            score = "simulator"
        plan = make_plan(
            cost,
            seq_length=spec.model.seq_length,
            num_stages=spec.pipeline_parallel,
            batch=spec.micro_batch_size,
            batch_mode="fixed",
            num_microbatches=spec.num_microbatches,
            strategy="dp",
            schedule=variant.schedule,
            score=score,
            split_backward=variant.split_backward,
        )
        answer = [plan.to_dict()]
    torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def _simulator_available() -> bool:
    try:
        from megatron_terapipe.simulate import ActionCosts, simulate  # noqa: F401
    except ImportError:
        return False
    return True
