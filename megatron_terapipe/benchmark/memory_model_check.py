"""The planner's memory model against the memory a run holds: predicted vs measured peaks.

Measured is the harness's warm-up step with the activation tracker (benchmark.memory: every
storage autograd saves plus what the token pipeline holds outside autograd, per rank);
predicted is `slicing.memory.ActivationMemoryModel.from_args` on the same pretrain_gpt.py
arguments, walking the schedule the variant ran. Stock rows are measured only: the model
describes the token pipeline (stock's attention saves its own keys and values).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from megatron_terapipe.benchmark.spec import BenchSpec, Variant, stock_1f1b, token_variant

MIB = float(1 << 20)
# Predicted within this fraction of measured, per rank: the goal the check prints.
TOLERANCE = 0.10


@dataclass(frozen=True)
class MemoryRow:
    """One variant on one rank."""

    variant: str
    rank: int
    measured_bytes: int
    predicted_bytes: float | None
    token_slices: tuple[int, ...]

    @property
    def error(self) -> float | None:
        if self.predicted_bytes is None or not self.measured_bytes:
            return None
        return self.predicted_bytes / self.measured_bytes - 1.0

    @property
    def within(self) -> bool | None:
        error = self.error
        return None if error is None else abs(error) <= TOLERANCE


def memory_spec(model: argparse.Namespace, num_microbatches: int,
                variants: list[Variant]) -> BenchSpec:
    """A spec whose run is the warm-up step only (memory and losses, no timed rounds)."""
    return BenchSpec(model=model, variants=tuple(variants),
                     pipeline_parallel=model.pipeline_model_parallel_size,
                     num_microbatches=num_microbatches, micro_batch_size=model.micro_batch_size,
                     warmup=1, iterations=0, measure_contention=False)


def default_variants(schedules: list[str], slice_counts: list[int],
                     split_backward: bool = False, chunks: int = 1) -> list[Variant]:
    """Stock 1F1B, then each order with each S; token-interleaved on `chunks` model chunks
    per rank (its point: with one chunk it is another 1F1B order)."""
    variants = [stock_1f1b()]
    for schedule in schedules:
        for count in slice_counts:
            variant = token_variant(schedule, count, split_backward=split_backward)
            if schedule == "token-interleaved" and chunks > 1:
                variant = replace(variant, name=f"{variant.name} V={chunks}",
                                  virtual_pipeline=chunks)
            variants.append(variant)
    return variants


def measure(spec: BenchSpec, timeout_s: float = 900.0) -> list[MemoryRow]:
    """Run the spec's ranks (gloo, one process each) and pair every peak with the model's."""
    from megatron_terapipe.benchmark.harness import run_benchmark
    from megatron_terapipe.compat import run_distributed

    results = run_distributed(run_benchmark, spec.pipeline_parallel, spec, timeout_s=timeout_s)
    return rows_from(spec, results)


def rows_from(spec: BenchSpec, rank_results: list[dict[str, Any]]) -> list[MemoryRow]:
    from megatron_terapipe.schedules.generators import build_schedule
    from megatron_terapipe.slicing.memory import ActivationMemoryModel

    memory = ActivationMemoryModel.from_args(spec.model)
    micro, batch = spec.num_microbatches, spec.micro_batch_size
    rows = []
    for index, variant in enumerate(spec.variants):
        runs = [result["runs"][index] for result in rank_results]
        slices = tuple(runs[0]["token_slices"]) or (spec.model.seq_length,)
        predicted: list[float | None] = [None] * len(runs)
        if not variant.is_stock:
            chunks = variant.virtual_pipeline or 1
            schedule = build_schedule(variant.schedule, spec.pipeline_parallel, micro,
                                      len(slices), chunks, split_backward=variant.split_backward)
            predicted = replace(memory, num_chunks=chunks).rank_peaks(
                schedule, [slices] * micro, [batch] * micro)
        for rank, (run, guess) in enumerate(zip(runs, predicted)):
            rows.append(MemoryRow(variant.name, rank, int(run["peak_activation_bytes"] or 0),
                                  guess, slices))
    return rows


def format_rows(rows: list[MemoryRow], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'variant':<30} {'rank':>4} {'measured MiB':>13} {'predicted MiB':>14} "
                 f"{'error':>8}")
    for row in rows:
        predicted = "-" if row.predicted_bytes is None else f"{row.predicted_bytes / MIB:.3f}"
        error = "-" if row.error is None else f"{row.error:+.1%}"
        lines.append(f"{row.variant:<30} {row.rank:>4} {row.measured_bytes / MIB:>13.3f} "
                     f"{predicted:>14} {error:>8}")
    checked = [row for row in rows if row.within is not None]
    worst = max((abs(row.error) for row in checked), default=0.0)
    met = all(row.within for row in checked)
    lines.append(f"goal: predicted within {TOLERANCE:.0%} of measured on every rank: "
                 f"{'met' if met else 'NOT met'} (worst {worst:.1%}, {len(checked)} rows)")
    return "\n".join(lines)
