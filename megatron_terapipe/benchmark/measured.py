"""From per-rank records to the numbers a comparison reports: step time, bubble, memory, loss.

Definitions (also in docs/benchmarks.md):
- step time: per round, the slowest rank's wall time of the forward-backward call (both start
  right after a barrier); the reported value is the median over timed rounds.
- measured bubble of stage p: 1 − busy_p / span, busy_p the time rank p spends in forward and
  backward actions, span the time from the first action to the last one on any rank (records
  are aligned: every rank counts from the same barrier). Computed by `simulate.Timeline`, the
  same code that computes the simulated bubble. Taken from the round whose step time is the
  median.
- peak activation memory of stage p: benchmark.memory's saved-for-backward plus schedule-held
  bytes, measured in the warm-up step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Measured:
    """One variant's measurements, merged over ranks."""

    name: str
    kind: str
    schedule: str
    token_slices: tuple[int, ...]
    step_times: list[float]  # per timed round, slowest rank
    median_round: int
    timeline: list[list]  # per rank, ActionRecords of the median round
    cpu_time: list[float]  # per rank, process CPU seconds of the median round
    peak_activation_bytes: list[int | None]
    cuda_peak_bytes: list[int | None]
    losses: list[float] | None
    virtual_pipeline: int | None = None
    attention: str = "sdpa"
    is_baseline: bool = False
    extra: dict = field(default_factory=dict)
    page_faults: list[int | None] = field(default_factory=list)  # per rank, median round
    split_backward: bool = False  # backwards ran as B (input gradient) + W (weight gradient)

    @property
    def step_time(self) -> float:
        return self.step_times[self.median_round]

    @property
    def num_stages(self) -> int:
        return len(self.timeline)


def merge_ranks(rank_results: Sequence[dict[str, Any]]) -> list[Measured]:
    """Combine what each rank returned from `harness.run_benchmark` into one entry per variant."""
    ordered = sorted(rank_results, key=lambda r: r["rank"])
    merged = []
    for index, first in enumerate(ordered[0]["runs"]):
        per_rank = [r["runs"][index] for r in ordered]
        rounds = len(first["step_times"])
        step_times = [max(run["step_times"][i] for run in per_rank) for i in range(rounds)]
        median_round = int(np.argsort(step_times)[(rounds - 1) // 2]) if rounds else 0
        losses = next((run["losses"] for run in per_rank if run["losses"] is not None), None)
        variant = first["variant"]
        merged.append(
            Measured(
                name=variant.name,
                kind=variant.kind,
                schedule=variant.schedule or variant.kind,
                token_slices=tuple(first["token_slices"]),
                step_times=step_times,
                median_round=median_round,
                timeline=[run["timelines"][median_round] if rounds else run["warmup_timeline"]
                          for run in per_rank],
                cpu_time=[run["cpu_times"][median_round] if rounds else float("nan")
                          for run in per_rank],
                page_faults=[run["page_faults"][median_round]
                             if rounds and run.get("page_faults") else None for run in per_rank],
                peak_activation_bytes=[run["peak_activation_bytes"] for run in per_rank],
                cuda_peak_bytes=[run["cuda_peak_bytes"] for run in per_rank],
                losses=losses,
                virtual_pipeline=variant.virtual_pipeline,
                attention=variant.attention,
                is_baseline=variant.is_baseline,
                split_backward=getattr(variant, "split_backward", False),
                extra={"plan": first.get("plan")} if first.get("plan") else {},
            )
        )
    return merged


def max_loss_difference(losses: list[float] | None, reference: list[float] | None) -> float:
    """Largest |loss − reference loss| over micro-batches (nan when either is missing); the
    reference is the same-kernel stock 1F1B run."""
    if losses is None or reference is None or len(losses) != len(reference):
        return float("nan")
    return float(max(abs(a - b) for a, b in zip(losses, reference)))
