"""Run a BenchSpec on its ranks and turn the measurements into comparison rows.

A row per variant: measured step time (median and min–max of the timed rounds), tokens/s,
speedup over the baseline, measured and simulated bubble per stage, the measured time breakdown
per stage (compute, communication wait, idle) and the single-stage inflation t_S/t_1, peak
activation memory per stage, the simulator's predicted step time (costs fitted on this machine)
and its error, an analytic-model prediction, and the largest loss difference to the baseline.

The baseline of every ratio is stock megatron-core 1F1B running the same attention kernel as the
token pipeline (same weights, same data). The verdict is the quiet-host gauge's (host_noise):
the speedup is taken per round (baseline round i over the row's round i, timed in the same
rotation), a spiked round's ratio is set aside and counted, and a row is faster or slower only
when the median speedup's confidence interval excludes 1, else a tie.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_terapipe.benchmark.contention import contention_factors
from megatron_terapipe.benchmark.fit import FittedCostModel, P2PFit, weight_grad_share
from megatron_terapipe.benchmark.host_noise import CONFIDENCE, ratio_interval
from megatron_terapipe.benchmark.measured import Measured, max_loss_difference, merge_ranks
from megatron_terapipe.benchmark.predict import (
    measured_timeline,
    predict,
    predict_with,
    replay,
)
from megatron_terapipe.benchmark.spec import EQUAL_FLOPS, KERNEL_DESCRIPTIONS, BenchSpec
from megatron_terapipe.simulate import SimulationResult, Timeline

MIB = 1024.0 * 1024.0


@dataclass
class Comparison:
    """Everything one comparison run produced; `rows` is what tables and --json show."""

    spec: BenchSpec
    rows: list[dict[str, Any]]
    measured: list[Measured]
    simulated: dict[str, SimulationResult]
    fitted: FittedCostModel | None
    p2p: P2PFit
    replayed: dict[str, SimulationResult] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def measured_timelines(self) -> dict[str, Timeline]:
        return {m.name: measured_timeline(m) for m in self.measured}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": _spec_summary(self.spec),
            "results": self.rows,
            "cost_fit": self.fitted.to_dict() if self.fitted is not None else None,
            "p2p": {"latency_s": self.p2p.latency_s,
                    "seconds_per_byte": self.p2p.seconds_per_byte},
            **self.extra,
        }


def run_comparison(spec: BenchSpec, threads_per_rank: int = 1, timeout_s: float = 3600.0
                   ) -> Comparison:
    """Spawn PP gloo ranks, run every variant (harness.run_benchmark), analyse."""
    from megatron_terapipe.benchmark.harness import run_benchmark
    from megatron_terapipe.compat import run_distributed

    load_before = os.getloadavg()
    results = run_distributed(run_benchmark, spec.pipeline_parallel, spec,
                              timeout_s=timeout_s, threads_per_rank=threads_per_rank)
    comparison = analyse(spec, results)
    # A 2-core box shared with other jobs: the load says how much the numbers can be trusted.
    comparison.extra["load_average_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    comparison.extra["threads_per_rank"] = threads_per_rank
    return comparison


def analyse(spec: BenchSpec, rank_results: list[dict[str, Any]]) -> Comparison:
    measured = merge_ranks(rank_results)
    p2p = P2PFit(**rank_results[0]["p2p"])
    simulated, fitted = predict(measured, spec.num_microbatches, spec.model.hidden_size,
                                spec.micro_batch_size, p2p)
    replayed = replay(measured, spec.num_microbatches, spec.model.hidden_size,
                      spec.micro_batch_size, p2p)
    analytic = _analytic_model(spec)
    baseline = next((m for m in measured if m.is_baseline), None)
    base_timeline = measured_timeline(baseline) if baseline is not None else None
    strategies = {v.name: v.strategy for v in spec.variants}
    rows = []
    for m in measured:
        timeline = measured_timeline(m)
        sim = simulated[m.name]
        rep = replayed[m.name]
        bubble = timeline.bubble_fraction()
        tokens = spec.num_microbatches * spec.micro_batch_size * spec.model.seq_length
        analytic_time = (predict_with(analytic, m, spec.num_microbatches, spec.micro_batch_size)
                         if analytic is not None else math.nan)
        breakdown = timeline.time_breakdown()
        rows.append({
            "schedule": m.name,
            "kind": m.kind,
            "order": m.schedule,
            "split_backward": m.split_backward,
            # per stage, W / (B + W) over its split backwards (None: nothing split there)
            "weight_grad_share": [weight_grad_share([[records]]) for records in m.timeline],
            "attention": m.attention,
            "attention_kernel": KERNEL_DESCRIPTIONS.get(m.attention, m.attention),
            "baseline": m.is_baseline,
            "slicing_strategy": strategies.get(m.name, ""),
            "num_token_slices": len(m.token_slices),
            "token_slices": list(m.token_slices),
            "step_time": m.step_time,
            "step_time_min": min(m.step_times, default=math.nan),
            "step_time_max": max(m.step_times, default=math.nan),
            "step_times": m.step_times,
            "tokens_per_s": tokens / m.step_time,
            # the median per-round speedup, its interval, the verdict on it, spikes set aside
            **judged_fields(m.step_times, baseline.step_times if baseline else None,
                            m.is_baseline),
            "bubble_measured": bubble,
            "bubble_simulated": list(sim.bubble_fraction),
            "bubble_error": max(abs(a - b) for a, b in zip(bubble, sim.bubble_fraction)),
            "bubble_replayed": list(rep.bubble_fraction),
            "bubble_error_replayed": max(abs(a - b) for a, b in zip(bubble, rep.bubble_fraction)),
            "replayed_step_time": rep.step_time,
            "compute_s": [p["compute"] for p in breakdown],
            "comm_wait_s": [p["comm_wait"] for p in breakdown],
            "idle_s": [p["idle"] for p in breakdown],
            "inflation": _inflation(timeline, base_timeline),
            "peak_activation_mib": [_mib(b) for b in m.peak_activation_bytes],
            # CPU the rank got per second it was computing: < 1 means other processes took it.
            "cpu_per_busy_s": [c / b if b > 0 else math.nan
                               for c, b in zip(m.cpu_time, timeline.busy_time())],
            "cuda_peak_mib": [_mib(b) for b in m.cuda_peak_bytes],
            "page_faults": list(m.page_faults),
            "predicted_step_time": sim.step_time,
            "prediction_error": sim.step_time / timeline.step_time() - 1.0,
            "measured_span": timeline.step_time(),
            "analytic_step_time": analytic_time,
            "max_loss_diff": max_loss_difference(m.losses, baseline.losses if baseline else None),
            **_planner_fields(m),
            "losses": m.losses,
        })
    return Comparison(spec, rows, measured, simulated, fitted, p2p, replayed,
                      extra={"analytic_model": getattr(analytic, "name", None),
                             "cpu_allocator": rank_results[0].get("allocator"),
                             "gradient_accumulation_fusion": all(
                                 r.get("gradient_accumulation_fusion") for r in rank_results),
                             "baseline": baseline.name if baseline is not None else None,
                             "contention": _contention(rank_results)})


def _contention(rank_results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per stage: the probe's rounds alone and together, and median together / median alone."""
    ordered = [r.get("contention") for r in sorted(rank_results, key=lambda r: r["rank"])]
    if not ordered or any(not c or not c["alone_s"] for c in ordered):
        return None
    alone = [c["alone_s"] for c in ordered]
    together = [c["together_s"] for c in ordered]
    return {"factor": contention_factors(alone, together), "alone_s": alone,
            "together_s": together}


def _planner_fields(m: Measured) -> dict[str, Any]:
    """For a planned row: who planned it, with which cost model, and the planner's own predicted
    step time next to the measured one (its error is the planner's, not the simulator fit's)."""
    plan = m.extra.get("plan")
    if not plan:
        return {"planned_by": None, "planner_predicted_step_time": None, "planner_error": None}
    predicted = plan.get("predicted_step_time")
    extra = plan.get("extra", {})
    return {
        "planned_by": plan.get("planned_by"),
        "planner_predicted_step_time": predicted,
        "planner_error": predicted / m.step_time - 1.0 if predicted else None,
        "plan_cost_model": plan.get("cost_model"),
        "plan_profile_seconds": extra.get("profile_seconds"),
        "plan_seconds": plan.get("planning_seconds"),
    }


def verdict_detail(step_times: Sequence[float], baseline_times: Sequence[float]
                   ) -> dict[str, Any]:
    """`verdict` with what it was judged on: the per-round speedup's interval, its coverage
    and how many spiked rounds were set aside."""
    blank = {"verdict": "", "speedup": None, "interval": None, "confidence": None,
             "set_aside": 0}
    if not step_times or not baseline_times:
        return blank
    try:
        interval, aside, noisy = ratio_interval(baseline_times, step_times)
    except ValueError as err:  # rounds that cannot be paired: no verdict, and why
        return {**blank, "verdict": f"not judged: {err}"}
    if noisy or interval.confidence < CONFIDENCE:  # the rounds say nothing either way
        result = "tie"
    elif interval.low > 1.0:
        result = "faster"
    elif interval.high < 1.0:
        result = "slower"
    else:
        result = "tie"
    return {"verdict": result, "speedup": interval.median,
            "interval": [interval.low, interval.high],
            "confidence": interval.confidence, "set_aside": aside}


def verdict(step_times: Sequence[float], baseline_times: Sequence[float]) -> str:
    """faster / slower than the baseline when the median per-round speedup's confidence
    interval (at least CONFIDENCE: 5 rounds or more) lies above / below 1, else tie: a
    difference within the rounds' noise is not a result, nor is any on a host too noisy to
    judge a goal on. Per round, because both sides'
    round i ran under the same host load; without the spiked rounds, which would otherwise
    stretch the interval over 1."""
    return verdict_detail(step_times, baseline_times)["verdict"]


def judged_fields(step_times: Sequence[float], baseline_times: Sequence[float] | None,
                  is_baseline: bool = False) -> dict[str, Any]:
    """A row's speedup over the baseline (the median of the per-round ratios), the interval
    its verdict judged, the verdict and the spiked rounds set aside; what `analyse` writes
    and what a saved run is judged again with."""
    if is_baseline or not baseline_times:
        return {"speedup": 1.0 if is_baseline else math.nan,
                "verdict": "baseline" if is_baseline else "", "speedup_low": None,
                "speedup_high": None, "speedup_confidence": None, "rounds_set_aside": 0}
    judged = verdict_detail(step_times, baseline_times)
    low, high = judged["interval"] or (None, None)
    return {"speedup": judged["speedup"], "verdict": judged["verdict"], "speedup_low": low,
            "speedup_high": high, "speedup_confidence": judged["confidence"],
            "rounds_set_aside": judged["set_aside"]}


def equal_flops_peer(rows: Sequence[dict[str, Any]], row: dict[str, Any]
                     ) -> dict[str, Any] | None:
    """The Seq1F1B equal-flops row with `row`'s order, split mode and slice count (None if the
    run has none): the peer that tables set beside our planner's row."""
    return next((r for r in rows if r.get("slicing_strategy") == EQUAL_FLOPS
                 and r["order"] == row["order"] and r["split_backward"] == row["split_backward"]
                 and r["num_token_slices"] == row["num_token_slices"]), None)


def _inflation(timeline: Timeline, baseline: Timeline | None) -> list[float]:
    """Per stage, summed compute of this run over the baseline's (t_S / t_1: what slicing, or
    another kernel, costs the stage's own work, bubbles aside)."""
    if baseline is None:
        return [math.nan] * timeline.num_stages
    return [c / b if b > 0 else math.nan
            for c, b in zip(timeline.busy_time(), baseline.busy_time())]


def _analytic_model(spec: BenchSpec) -> Any:
    """The slicing package's analytic model with its CPU preset, for reference."""
    try:
        from megatron_terapipe.slicing.cost_models import AnalyticCostModel
    except ImportError:
        return None
    model = spec.model
    return AnalyticCostModel.from_preset(
        "cpu",
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        pipeline_model_parallel_size=spec.pipeline_parallel,
    )


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def _spec_summary(spec: BenchSpec) -> dict[str, Any]:
    model = spec.model
    return {
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "seq_length": model.seq_length,
        "vocab_size": model.vocab_size,
        "micro_batch_size": spec.micro_batch_size,
        "pipeline_model_parallel_size": spec.pipeline_parallel,
        "num_microbatches": spec.num_microbatches,
        "warmup": spec.warmup,
        "iterations": spec.iterations,
        "variants": [v.name for v in spec.variants],
        "attention": {v.name: v.attention for v in spec.variants},
        "notes": list(spec.extra.get("notes", [])) + _measurement_notes(spec),
        # every model setting the run was built from (MoE flags included), so a saved run
        # says which model it timed
        "model_settings": {
            key: value
            for key, value in sorted(vars(model).items())
            if isinstance(value, (bool, int, float, str, type(None)))
            or (isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float, str)) for v in value))
        },
    }


def _measurement_notes(spec: BenchSpec) -> list[str]:
    """What this run could not measure, and why (harness)."""
    from megatron_terapipe.benchmark.harness import contention_measurable, memory_measurable

    notes = []
    if spec.measure_memory and not memory_measurable(spec):
        notes.append("peak activation memory not measured with --overlap-grad-reduce (the "
                     "saved-tensor hooks that count it hide a megatron-core weight attribute "
                     "that DDP's overlapped reduction needs)")
    if (spec.measure_contention and spec.pipeline_parallel > 1
            and not contention_measurable(spec)):
        notes.append("contention probe skipped with --overlap-grad-reduce (its backwards "
                     "would start reductions no step finishes)")
    return notes
