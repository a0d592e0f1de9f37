"""DP-planned token slices for a benchmark variant, from costs measured in the same run.

The planner (slicing.planner.make_plan, TeraPipe's Algorithm 1) needs a cost model; on this
machine the honest one is fitted to the warm-up round's own timelines, so the plan is what the
DP would choose for this CPU, not for a data-sheet device.
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


def plan_slices(
    spec: BenchSpec,
    variant: Variant,
    warm: dict[str, tuple[tuple[int, ...], list]],
    p2p: P2PFit,
) -> tuple[int, ...]:
    """Slices for `variant`; every rank takes part (collectives) and gets rank 0's answer.

    `warm` maps a name to (token_slices, this rank's records); it should hold a step with
    varied slice lengths (harness.calibration_slices) besides any equal-slice warm-ups.
    """
    from megatron_terapipe.slicing.planner import make_plan

    runs = [(slices, _gather(records)) for _, (slices, records) in sorted(warm.items())]
    cost = fit_cost_model(runs, spec.pipeline_parallel, spec.model.hidden_size, p2p)
    answer: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        score = "formula"
        if variant.schedule != "terapipe" and _simulator_available():
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
        )
        answer = [tuple(plan.token_slices)]
    torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def _simulator_available() -> bool:
    try:
        from megatron_terapipe.simulate import ActionCosts, simulate  # noqa: F401
    except ImportError:
        return False
    return True
