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


def _profile_tiny_moe(rank: int, world_size: int) -> dict:
    import os

    from megatron_terapipe.slicing import ProfileGrid, measure_fn_for_megatron_stage, profile_stage
    from megatron_terapipe.slicing.profiler import startup_profile
    from megatron_terapipe.training import args as targs
    from megatron_terapipe.training.config_files import read_config

    moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
               moe_shared_expert_intermediate_size=16)
    measure = measure_fn_for_megatron_stage(
        num_layers=2, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=2,
        warmup=1, repeats=1, **moe,
    )
    profile = profile_stage(measure, ProfileGrid((1,), (8, 32), (0, 16), seq_length=64))
    # What --token-pipeline-slices auto profiles for the trainer's MoE config.
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                          "tiny-cpu-moe.args")
    args = targs.finalize_args(targs.parse_args(read_config(config)), 2)
    startup = startup_profile(args, granularity=16)
    return {"dims": measure.dims, "moe_layers": measure.moe_layers,
            "samples": profile.meta["samples"], "startup_dims": startup.meta["dims"],
            "startup_moe_layers": startup.meta["moe_layers"]}


def test_profiler_times_the_moe_layers_of_an_moe_stage():
    """An MoE GPT's stage is profiled on megatron-core MoE layers (router, experts, shared
    expert), from keywords as from the trainer's MoE flags."""
    from megatron_terapipe.compat import run_distributed

    (out,) = run_distributed(_profile_tiny_moe, 1, timeout_s=120.0)
    assert out["moe_layers"] == out["dims"]["layers_per_stage"] == 1
    assert out["dims"]["num_experts"] == 4 and out["dims"]["moe_ffn_hidden_size"] == 32
    assert all(s[3] > 0 for s in out["samples"])
    assert out["startup_moe_layers"] == 1  # one profiled layer, scaled to the stage's two
    startup = out["startup_dims"]
    assert (startup["num_experts"], startup["moe_router_topk"], startup["moe_ffn_hidden_size"]) == (
        4, 2, 64)
