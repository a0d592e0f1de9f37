"""The rank-side body of a benchmark: every variant in the same process pair, interleaved.

Machine noise on a shared CPU box drifts over minutes, so variants are not run one after the
other: each round runs one step of every variant (in a rotating order), and a variant's step
time is the median over rounds. Round 0 is the warm-up; it also measures peak activation memory
(saved-tensor hooks cost a little time, so they stay out of the timed rounds) and the losses.
Every rank keeps the memory it frees (compat.allocator): no variant pays the page faults of
re-faulted activations, an allocator term a GPU run does not have.
Stock and token steps are timed alike: the step's wall time by `synchronized_clock` around the
call, its actions by one `StepClock` per step (the executor's own, the stock recorder's), which
synchronises the device at its start and end only, with a profiler range around each action.
Planned variants get their slices after round 0: DP-planned ones from costs fitted to round 0's
timelines, `auto` ones from the product's own planner (benchmark.planning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from megatron_terapipe.benchmark.contention import StageProbe, probe_round
from megatron_terapipe.benchmark.fit import P2PFit
from megatron_terapipe.benchmark.memory import ActivationMemoryTracker, observe_token_pipeline
from megatron_terapipe.benchmark.models import (
    BuiltModel,
    build_model,
    gather_global_weights,
    load_weights,
    virtual_pipeline,
)
from megatron_terapipe.benchmark.p2p import calibrate_p2p
from megatron_terapipe.benchmark.spec import SAME_KERNEL, BenchSpec, Variant
from megatron_terapipe.benchmark.stock_timeline import StockRecorder
from megatron_terapipe.compat.allocator import allocator_note, keep_freed_memory, minor_page_faults
from megatron_terapipe.model.synthetic_batches import synthetic_microbatches
from megatron_terapipe.timing import synchronized_clock
from megatron_terapipe.training.data import forward_step


@dataclass
class VariantRun:
    """What one rank measured for one variant."""

    variant: Variant
    token_slices: tuple[int, ...] = ()
    step_times: list[float] = field(default_factory=list)  # timed rounds, this rank
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds in those steps
    page_faults: list[int] = field(default_factory=list)  # minor page faults in those steps
    timelines: list[list] = field(default_factory=list)  # ActionRecords per timed round
    warmup_timeline: list = field(default_factory=list)
    peak_activation_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    losses: list[float] | None = None  # per micro-batch, last stage only
    plan: dict | None = None  # SlicingPlan.to_dict() of a planned variant
    error: str | None = None


class _Runner:
    """One variant's forward-backward function bound to its model."""

    def __init__(self, spec: BenchSpec, variant: Variant, built: BuiltModel) -> None:
        self.spec = spec
        self.variant = variant
        self.built = built
        self.recorder = StockRecorder(built.chunks) if variant.is_stock else None
        self.func = self._make_func()

    def _make_func(self):
        if self.variant.is_stock:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            return get_forward_backward_func(
                pp_size=self.spec.pipeline_parallel, vp_size=self.variant.virtual_pipeline
            )
        from megatron_terapipe import TokenPipelineConfig, get_forward_backward_func

        kwargs: dict[str, Any] = {
            "schedule": self.variant.schedule,
            "record_timeline": True,
            "split_backward": self.variant.split_backward,
        }
        if self.variant.token_slices is not None:
            kwargs["token_slices"] = self.variant.token_slices
        else:
            kwargs["num_token_slices"] = self.variant.num_token_slices
        return get_forward_backward_func(TokenPipelineConfig(**kwargs))

    def step(self, batches: list, tracker: ActivationMemoryTracker | None = None):
        """One forward-backward; returns (seconds on this rank, losses, records).

        `self.cpu_time` is left holding the process CPU seconds of the step: next to the
        busy time of the records it shows how much CPU the rank actually got (a shared box);
        `self.page_faults` its minor page faults (an allocator term, see compat.allocator).
        """
        from megatron.core import parallel_state

        spec = self.spec
        for chunk in self.built.chunks:
            chunk.zero_grad_buffer()
        n_chunks = len(self.built.chunks)
        iterators = [iter(list(batches)) for _ in range(n_chunks)]
        data = iterators if n_chunks > 1 else iterators[0]
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        with virtual_pipeline(self.built.virtual_pipeline), _instrumented(self, tracker):
            torch.distributed.barrier(group=pp_group)
            cpu0 = time.process_time()
            faults0 = minor_page_faults()
            t0 = synchronized_clock()
            if self.recorder is not None:
                # What the token executor does inside func: barrier, StepClock.start
                self.recorder.start(pp_group)
            losses = self.func(
                forward_step_func=forward_step,
                data_iterator=data,
                model=self.built.model_arg,
                num_microbatches=spec.num_microbatches,
                seq_length=spec.model.seq_length,
                micro_batch_size=spec.micro_batch_size,
                forward_only=False,
            )
            if self.recorder is not None:
                self.recorder.finish()  # as the executor's StepTimeline.finish, inside func
            elapsed = synchronized_clock() - t0
            self.cpu_time = time.process_time() - cpu0
            self.page_faults = minor_page_faults() - faults0
        records = self.recorder.records if self.recorder is not None else self.func.last_timeline
        return elapsed, losses, list(records)

    @property
    def token_slices(self) -> tuple[int, ...]:
        if self.variant.is_stock:
            return (self.spec.model.seq_length,)
        return tuple(self.func.last_token_slices)


class _instrumented:
    """Stock recorder always; saved-tensor and KV-store counting when a tracker is given."""

    def __init__(self, runner: _Runner, tracker: ActivationMemoryTracker | None) -> None:
        import contextlib

        self.stack = contextlib.ExitStack()
        self.runner = runner
        self.tracker = tracker

    def __enter__(self):
        if self.runner.recorder is not None:
            self.stack.enter_context(self.runner.recorder.installed())
        if self.tracker is not None:
            self.stack.enter_context(self.tracker.saved_tensors())
            self.stack.enter_context(observe_token_pipeline(self.tracker))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _loss_values(losses: list) -> list[float] | None:
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    values = []
    for item in losses:
        report = item["lm loss"].detach().float().view(-1)
        values.append(float(report[0] / report[1]) if report.numel() == 2 else float(report[0]))
    return values


def _memory_step(runner: _Runner, batches: list, run: VariantRun) -> tuple:
    tracker = ActivationMemoryTracker(exclude=runner.built.parameters())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elapsed, losses, records = runner.step(batches, tracker)
    run.peak_activation_bytes = int(tracker.peak_bytes)
    if cuda:
        run.cuda_peak_bytes = int(torch.cuda.max_memory_allocated() - base)
    return elapsed, losses, records


def run_benchmark(rank: int, world_size: int, spec: BenchSpec) -> dict[str, Any]:
    """Body of each rank (for `compat.run_distributed`); returns this rank's VariantRuns."""
    from megatron.core import parallel_state, tensor_parallel

    if world_size != spec.pipeline_parallel:
        raise ValueError(
            f"benchmark runs one pipeline (world size = PP = {spec.pipeline_parallel}), "
            f"got world size {world_size}"
        )
    # Before the first large allocation, so that every variant runs on memory the process keeps.
    allocator_held = keep_freed_memory()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=spec.pipeline_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(spec.init_seed)
    torch.manual_seed(spec.init_seed)

    models = _build_models(spec)
    p2p = calibrate_p2p(spec.model.hidden_size, spec.micro_batch_size) if world_size > 1 else (
        P2PFit())
    batches = _batches(spec, spec.data_seed)
    fixed = [v for v in spec.variants if not v.slices_from_planner]
    runners = {v.name: _Runner(spec, v, models[_model_key(v)]) for v in fixed}
    runs = {v.name: VariantRun(v) for v in spec.variants}

    # Round 0: warm-up, memory, losses.
    for variant in fixed:
        _warmup(runners[variant.name], batches, runs[variant.name], spec)
    planned = [v for v in spec.variants if v.slices_from_planner]
    if planned:
        from megatron_terapipe.benchmark.planning import auto_plan, plan_slices

        warm = {name: (run.token_slices, run.warmup_timeline) for name, run in runs.items()
                if not run.variant.is_stock and run.warmup_timeline}
        if any(v.planned for v in planned):
            warm["~calibration"] = _calibrate(spec, models)
        for variant in planned:
            plan = (auto_plan(spec, variant) if variant.auto
                    else plan_slices(spec, variant, warm, p2p))
            concrete = replace(variant, token_slices=tuple(plan["token_slices"]))
            runs[variant.name].variant = concrete
            runs[variant.name].plan = {**plan, "planned_by": "auto" if variant.auto else "fit"}
            runners[variant.name] = _Runner(spec, concrete, models[_model_key(variant)])
            _warmup(runners[variant.name], batches, runs[variant.name], spec)

    probe, alone, together = None, [], []
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if contention_measurable(spec):
        probe = StageProbe(models[(SAME_KERNEL, None)].chunks[0], batches[0],
                           spec.model.hidden_size)
        probe_round(probe, pp_group)  # warm-up
    order = [v.name for v in spec.variants]
    # Untimed rounds of every variant after planning: round 0 measured memory under hooks and
    # the planner's profiling ran since, so the first timed step of a variant would otherwise
    # pay for cold caches and fresh pages (the first in the order most).
    for _ in range(spec.warmup):
        for name in order:
            runners[name].step(batches)
    for round_index in range(spec.iterations):
        if probe is not None:
            seconds = probe_round(probe, pp_group)
            alone.append(seconds[0])
            together.append(seconds[1])
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            elapsed, _, records = runners[name].step(batches)
            runs[name].step_times.append(elapsed)
            runs[name].cpu_times.append(runners[name].cpu_time)
            runs[name].page_faults.append(runners[name].page_faults)
            runs[name].timelines.append(records)
    return {
        "rank": rank,
        "runs": [vars(run) for run in runs.values()],
        "p2p": {"latency_s": p2p.latency_s, "seconds_per_byte": p2p.seconds_per_byte},
        "allocator": allocator_note(allocator_held),
        "contention": {"alone_s": alone, "together_s": together} if probe is not None else None,
        # What the built models run with (the flag, where megatron-core has the kernel).
        "gradient_accumulation_fusion": all(
            built.config.gradient_accumulation_fusion for built in models.values()),
        # megatron-core MoE layers in this rank's baseline model (0: a dense GPT), so a report
        # can say which model ran, and the MoE flags are seen to reach it.
        "moe_layers": _moe_layers(models[(SAME_KERNEL, None)]),
    }


def _moe_layers(built: BuiltModel) -> int:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return sum(isinstance(m, MoELayer) for chunk in built.chunks for m in chunk.modules())


def _overlaps_grad_reduce(spec: BenchSpec) -> bool:
    return bool(getattr(spec.model, "overlap_grad_reduce", False))


def memory_measurable(spec: BenchSpec) -> bool:
    """Whether the warm-up measures peak activation memory. Not with --overlap-grad-reduce:
    autograd hands a saved weight back through saved-tensor hooks as a new tensor object,
    without the `grad_added_to_main_grad` attribute megatron-core's fused linear backward reads,
    so the layer returns no weight gradient and DDP's overlapped reduction asserts."""
    return spec.measure_memory and not _overlaps_grad_reduce(spec)


def contention_measurable(spec: BenchSpec) -> bool:
    """Whether the rounds run the contention probe: with more than one stage, and not with
    --overlap-grad-reduce (its backwards would start reductions that no step finishes)."""
    return spec.measure_contention and spec.pipeline_parallel > 1 and not _overlaps_grad_reduce(
        spec)


def _warmup(runner: _Runner, batches: list, run: VariantRun, spec: BenchSpec) -> None:
    """Round 0 of a variant: its losses, its peak memory, and a plain step's timeline (the
    planner's warm measurements); the untimed warm-up rounds come after planning."""
    if memory_measurable(spec):
        _, losses, records = _memory_step(runner, batches, run)
        _, _, records = runner.step(batches)
    else:
        _, losses, records = runner.step(batches)
    run.losses = _loss_values(losses)
    run.warmup_timeline = records
    run.token_slices = runner.token_slices


def calibration_slices(seq_length: int, count: int = 6) -> tuple[int, ...]:
    """Halving slice lengths (L/2, L/4, ..., twice the last): one step measures slices of many
    lengths at many contexts, which equal slices cannot (their fixed and per-token costs are
    inseparable, and a planner fed such a fit picks absurdly thin slices)."""
    lengths = []
    remaining = seq_length
    for _ in range(count - 1):
        length = remaining // 2
        if length < 1:
            break
        lengths.append(length)
        remaining -= length
    return tuple(lengths + [remaining]) if remaining > 0 else tuple(lengths)


def _calibrate(spec: BenchSpec, models: dict) -> tuple[tuple[int, ...], list]:
    """Two untimed steps with calibration_slices; the planner fits the second one."""
    from megatron_terapipe.benchmark.spec import token_variant

    slices = calibration_slices(spec.model.seq_length)
    variant = token_variant("terapipe", token_slices=slices)
    runner = _Runner(spec, variant, models[_model_key(variant)])
    batches = _batches(spec, 0)
    runner.step(batches)
    _, _, records = runner.step(batches)
    return runner.token_slices, records


def _batches(spec: BenchSpec, seed: int) -> list:
    return synthetic_microbatches(spec.model.vocab_size, spec.model.seq_length,
                                  spec.micro_batch_size, spec.num_microbatches, seed)


def _model_key(variant: Variant) -> tuple[str, int | None]:
    """(attention kernel, virtual stages): stock 1F1B on the same kernel and every token
    variant without virtual stages run the very same model object."""
    return variant.attention, variant.virtual_pipeline


def _build_models(spec: BenchSpec) -> dict[tuple[str, int | None], BuiltModel]:
    """One model per distinct (kernel, layout), all loaded with the same-kernel model's weights."""
    reference_key = (SAME_KERNEL, None)
    keys = list(dict.fromkeys([reference_key] + [_model_key(v) for v in spec.variants]))
    models: dict[tuple[str, int | None], BuiltModel] = {}
    for attention, chunks in keys:
        models[(attention, chunks)] = build_model(spec.model, attention, chunks)
    reference = gather_global_weights(models[reference_key])
    for key, built in models.items():
        if key != reference_key:
            load_weights(built, reference)
    return models
