"""The benchmark scripts take an MoE GPT through pretrain_gpt.py's MoE flags.

`--num-experts`, `--moe-router-topk`, ... reach the benchmark model of both scripts (not set
aside as training-only flags), the harness builds megatron-core MoE layers from them, and one
round of stock 1F1B (same kernel, the baseline) and the token schedules gives the same losses
on the same weights and data, as for a dense GPT.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from megatron_terapipe.testing.moe import TINY_MOE_FLAGS as MOE_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # fp32, the same weights and data: the losses differ by summation order only
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "64", "--num-microbatches", "2"]  # fmt: skip


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["compare_schedules", "bench_step"])
def test_moe_flags_shape_the_benchmark_model(script):
    from megatron_terapipe.training.model import transformer_config_from_args

    module = _script(script)
    args = module.parse_args([*TINY, *MOE_FLAGS])
    assert args.ignored_flags == []  # model flags, not training-only ones set aside
    build = module.build_spec if script == "compare_schedules" else (
        lambda a: module.spec_for(a, 2))
    model = build(args).model
    config = transformer_config_from_args(model)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (
        4, 2, 32)
    assert config.moe_aux_loss_coeff == 0.01 and config.moe_z_loss_coeff == 0.001
    with pytest.raises(SystemExit, match="--expert-model-parallel-size=2"):
        build(module.parse_args([*TINY, *MOE_FLAGS, "--expert-model-parallel-size", "2"]))


def test_harness_runs_moe_and_token_losses_equal_stock_1f1bs():
    from megatron_terapipe.benchmark.compare import analyse
    from megatron_terapipe.benchmark.harness import run_benchmark
    from megatron_terapipe.benchmark.spec import STOCK_1F1B
    from megatron_terapipe.compat import run_distributed

    module = _script("compare_schedules")
    args = module.parse_args([
        *TINY, *MOE_FLAGS, "--token-schedules", "terapipe,token-1f1b", "--num-token-slices", "2",
        "--no-local-attention", "--no-auto", "--no-planned", "--no-equal-flops",
        "--no-contention-probe", "--warmup", "1", "--iterations", "1",
    ])  # fmt: skip
    spec = module.build_spec(args)
    names = [v.name for v in spec.variants]
    assert len(names) == 3 and spec.variants[0].kind == STOCK_1F1B, names
    results = run_distributed(run_benchmark, spec.pipeline_parallel, spec, timeout_s=240)
    assert [r["moe_layers"] for r in results] == [1, 1]  # one MoE layer per stage
    last = {run["variant"].name: run for run in results[-1]["runs"]}
    stock = last[names[0]]["losses"]
    assert len(stock) == 2, stock
    for name in names[1:]:
        token = last[name]["losses"]
        assert len(token) == len(stock), (name, token)
        for t, s in zip(token, stock):
            assert abs(t - s) <= RTOL * abs(s), (name, token, stock)
    saved = analyse(spec, results).to_dict()
    assert {row["schedule"] for row in saved["results"]} == set(names)
    # a saved run names the model it timed, MoE settings included
    settings = saved["config"]["model_settings"]
    assert (settings["num_experts"], settings["moe_router_topk"]) == (4, 2), settings
    assert settings["moe_token_dispatcher_type"] == "alltoall"
    json.dumps(saved, default=float)
