"""Rank body: one benchmark step of every variant, counting device synchronisations and
profiler ranges (tests/test_bench_timing.py)."""

from __future__ import annotations

from typing import Any


def step_instrumentation(rank: int, world_size: int, spec: Any) -> dict[str, dict[str, Any]]:
    """Per variant: device synchronisations in one timed harness step, its records, and the
    `pipeline ...` profiler ranges of one profiled step next to the names its records imply."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_terapipe import timing
    from megatron_terapipe.benchmark import harness

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=spec.pipeline_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(spec.init_seed)
    models = harness._build_models(spec)
    batches = harness._batches(spec, spec.data_seed)
    out = {}
    for variant in spec.variants:
        runner = harness._Runner(spec, variant, models[harness._model_key(variant)])
        runner.step(batches)  # warm-up
        calls: list[int] = []
        original = timing.device_synchronize
        timing.device_synchronize = lambda calls=calls: calls.append(1)  # every clock waits here
        try:
            _, _, records = runner.step(batches)
        finally:
            timing.device_synchronize = original
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as profiler:
            _, _, profiled = runner.step(batches)
        ranges = [e.name for e in profiler.events() if e.name.startswith(timing.RANGE_PREFIX)]
        out[variant.name] = {
            "kind": variant.kind,
            "synchronisations": len(calls),
            "records": len(records),
            "computes": sum(r.kind != "comm" for r in records),
            "ranges": sorted(ranges),
            "record_ranges": sorted(
                timing.action_range_name(r.kind, r.microbatch, r.token_slice, r.chunk)
                for r in profiled),
        }
    return out
