"""The profiler on the real megatron-core stack: prefix-KV attention layers of one stage."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")


def _profile_tiny(rank: int, world_size: int) -> dict:
    from megatron_terapipe.slicing import (
        ProfileGrid,
        make_plan,
        measure_fn_for_megatron_stage,
        profile_stage,
    )

    measure = measure_fn_for_megatron_stage(
        num_layers=2, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=2,
        warmup=1, repeats=1,
    )
    grid = ProfileGrid((1, 2), (8, 32), (0, 16), seq_length=64)
    profile = profile_stage(measure, grid)
    plan = make_plan(profile, seq_length=64, num_stages=2, granularity=8)
    return {"dims": measure.dims, "device": measure.device, "r2": profile.r2,
            "no_context": profile.no_context.tolist(), "slices": plan.token_slices,
            "samples": profile.meta["samples"]}


def test_profiler_times_the_megatron_stage():
    from megatron_terapipe.compat import run_distributed

    (out,) = run_distributed(_profile_tiny, 1, timeout_s=120.0)
    assert out["dims"]["layers_per_stage"] == 1
    assert len(out["samples"]) == 2 * (2 + 2)
    assert all(s[3] > 0 for s in out["samples"])
    assert sum(out["slices"]) == 64
