"""Simulator predictions for the measured runs, and measured timelines in the simulator's form.

Measured and predicted steps go through the same `simulate.Timeline` class, so the bubble is
computed by one function for both and the plots draw both with the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_terapipe.benchmark.fit import (
    BACKWARD,
    FORWARD,
    WEIGHT_GRAD,
    FittedCostModel,
    P2PFit,
    fit_cost_model,
    mean_action_times,
    weight_grad_share,
)
from megatron_terapipe.benchmark.measured import Measured
from megatron_terapipe.benchmark.spec import STOCK_1F1B, STOCK_INTERLEAVED
from megatron_terapipe.schedules.generators import build_schedule
from megatron_terapipe.simulate import ActionCosts, SimulationResult, Timeline, TimelineEvent
from megatron_terapipe.simulate import simulate as run_simulator


def measured_timeline(measured: Measured, label: str | None = None) -> Timeline:
    """The median round's records of every rank as one Timeline (times from the step barrier)."""
    events = [
        TimelineEvent(stage, r.kind, r.microbatch, r.token_slice, max(r.chunk, 0), r.start, r.end)
        for stage, records in enumerate(measured.timeline)
        for r in records
    ]
    return Timeline(
        events=events,
        num_stages=measured.num_stages,
        label=label or f"{measured.name} (measured)",
        metadata={"source": "measured", "schedule": measured.schedule},
    )


def schedule_of(measured: Measured, num_microbatches: int) -> Any:
    """The IR schedule that describes what ran: stock variants map to their IR twins."""
    stages = measured.num_stages
    if measured.kind == STOCK_1F1B:
        return build_schedule("1f1b", stages, num_microbatches)
    if measured.kind == STOCK_INTERLEAVED:
        return build_schedule("interleaved", stages, num_microbatches, 1, measured.virtual_pipeline)
    return build_schedule(measured.schedule, stages, num_microbatches, len(measured.token_slices),
                          split_backward=measured.split_backward)


def token_costs(model: FittedCostModel, share: float | None = None) -> ActionCosts:
    """The fitted model's costs; a split backward's W priced at the measured `share` of it."""
    return ActionCosts(
        forward=lambda stage, chunk, length, context: model.action_time(
            FORWARD, stage, length, context),
        backward=lambda stage, chunk, length, context: model.action_time(
            BACKWARD, stage, length, context),
        transfer=lambda length: model.p2p_time(1, length),
        name=model.name,
        weight_grad_share=0.5 if share is None else share,
    )


def stock_costs(measured: Measured, p2p: P2PFit, hidden_size: int, micro_batch_size: int,
                bytes_per_element: int = 4) -> ActionCosts:
    """Each stock action priced at its own measured mean (its kernel differs from ours)."""
    means = mean_action_times(measured.timeline)

    def price(kind: str, stage: int, chunk: int) -> float:
        return means.get((kind, stage, chunk), means.get((kind, stage, 0), 0.0))

    return ActionCosts(
        forward=lambda stage, chunk, length, context: price(FORWARD, stage, chunk),
        backward=lambda stage, chunk, length, context: price(BACKWARD, stage, chunk),
        transfer=lambda length: float(p2p(length * micro_batch_size * hidden_size
                                          * bytes_per_element)),
        name="measured means (stock kernel)",
    )


def replay_costs(measured: Measured, p2p: P2PFit, hidden_size: int, micro_batch_size: int,
                 bytes_per_element: int = 4) -> ActionCosts:
    """Each action priced at the measured duration of that very slice in this run (mean over
    micro-batches): the simulation then tests only the schedule and communication model."""
    from megatron_terapipe.token_slices import slice_offsets

    offsets = slice_offsets(measured.token_slices)
    sums: dict[tuple, list[float]] = {}
    for stage, records in enumerate(measured.timeline):
        for r in records:
            if r.kind in (FORWARD, BACKWARD, WEIGHT_GRAD):
                key = (r.kind, stage, max(r.chunk, 0), measured.token_slices[r.token_slice],
                       offsets[r.token_slice])
                sums.setdefault(key, []).append(r.end - r.start)
    means = {key: sum(v) / len(v) for key, v in sums.items()}
    # ActionCosts.backward prices a whole backward: a split one is its B plus its W
    for (kind, *where), value in list(means.items()):
        if kind == WEIGHT_GRAD:
            means[(BACKWARD, *where)] = means.get((BACKWARD, *where), 0.0) + value

    def price(kind: str, stage: int, chunk: int, length: int, context: int) -> float:
        return means.get((kind, stage, chunk, length, context), 0.0)

    return ActionCosts(
        forward=lambda stage, chunk, length, context: price(FORWARD, stage, chunk, length,
                                                            context),
        backward=lambda stage, chunk, length, context: price(BACKWARD, stage, chunk, length,
                                                             context),
        transfer=lambda length: float(p2p(length * micro_batch_size * hidden_size
                                          * bytes_per_element)),
        name="replay of measured action times",
        weight_grad=lambda stage, chunk, length, context: price(WEIGHT_GRAD, stage, chunk,
                                                                length, context),
    )


def replay(measured: Sequence[Measured], num_microbatches: int, hidden_size: int,
           micro_batch_size: int, p2p: P2PFit) -> dict[str, SimulationResult]:
    """Simulated step of every variant with its own measured per-slice action times."""
    out = {}
    for m in measured:
        costs = replay_costs(m, p2p, hidden_size, micro_batch_size)
        out[m.name] = run_simulator(schedule_of(m, num_microbatches), m.token_slices, costs)
        out[m.name].timeline.label = f"{m.name} (replayed)"
    return out


def fit_token_model(measured: Sequence[Measured], hidden_size: int, p2p: P2PFit
                    ) -> FittedCostModel | None:
    runs = [(m.token_slices, m.timeline) for m in measured if not m.kind.startswith("stock")]
    if not runs:
        return None
    return fit_cost_model(runs, measured[0].num_stages, hidden_size, p2p)


def predict(
    measured: Sequence[Measured],
    num_microbatches: int,
    hidden_size: int,
    micro_batch_size: int,
    p2p: P2PFit,
) -> tuple[dict[str, SimulationResult], FittedCostModel | None]:
    """Simulated step of every measured variant with costs fitted on this machine."""
    token_model = fit_token_model(measured, hidden_size, p2p)
    share = weight_grad_share([m.timeline for m in measured if m.split_backward])
    results = {}
    for m in measured:
        if m.kind.startswith("stock"):
            costs = stock_costs(m, p2p, hidden_size, micro_batch_size)
        else:
            costs = token_costs(token_model, share)
        results[m.name] = run_simulator(schedule_of(m, num_microbatches), m.token_slices, costs)
        results[m.name].timeline.label = f"{m.name} (simulated)"
    return results, token_model


def predict_with(cost_model: Any, measured: Measured, num_microbatches: int,
                 micro_batch_size: int) -> float:
    """Step time a stage cost model (analytic, profiled) predicts for one measured variant."""
    chunks = measured.virtual_pipeline or 1
    costs = ActionCosts.from_stage_cost_model(cost_model, batch=micro_batch_size,
                                              num_chunks=chunks)
    return run_simulator(schedule_of(measured, num_microbatches), measured.token_slices,
                         costs).step_time
