"""SlicingPlan, its Megatron-style print, plan_from_args and the rank-0 broadcast."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import socket
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_terapipe.config import TokenPipelineConfig
from megatron_terapipe.slicing import (
    LatencyTableCostModel,
    SlicingPlan,
    broadcast_plan,
    cost_model_from_args,
    format_plan,
    parse_token_pipeline_slices,
    plan_and_broadcast,
    plan_from_args,
    predict_step_time,
)


def plan() -> SlicingPlan:
    return SlicingPlan((96, 64, 64, 32), (2,), 1.25, 0.05, "dp", "analytic:v100",
                       {"granularity": 32, "nested": {"a": np.float64(1.5)}})


def test_plan_roundtrips_through_json():
    original = plan()
    data = json.loads(json.dumps(original.to_dict()))
    again = SlicingPlan.from_dict(data)
    assert again == SlicingPlan.from_dict(original.to_dict())
    assert again.token_slices == (96, 64, 64, 32) and again.extra["nested"]["a"] == 1.5
    nan = SlicingPlan((8,), (1,), math.nan, math.inf, "explicit", "x")
    back = SlicingPlan.from_dict(json.loads(json.dumps(nan.to_dict())))
    assert math.isnan(back.predicted_step_time) and math.isnan(back.t_max)
    with pytest.raises(ValueError, match="needs"):
        SlicingPlan.from_dict({"token_slices": [1]})


def test_plan_feeds_the_executor_config():
    config = TokenPipelineConfig(plan=plan())
    assert config.resolve_token_slices(256) == (96, 64, 64, 32)


def test_format_plan_reads_like_megatron_arguments():
    lines = format_plan(plan()).splitlines()
    assert lines[0] == "-" * 24 + " token pipeline plan " + "-" * 24
    assert lines[-1] == "-" * 20 + " end of token pipeline plan " + "-" * 21
    body = lines[1:-1]
    names = [line.split()[0] for line in body]
    assert names == sorted(names, key=str.lower)
    row = next(line for line in body if line.split()[0] == "token_slices")
    assert row.startswith("  token_slices ....") and row.endswith("[96, 64, 64, 32]")
    assert all(len(line.split(" ")[3]) >= 1 for line in body)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", ("auto", None)),
        (None, ("auto", None)),
        ("4", ("count", 4)),
        (4, ("count", 4)),
        (["6"], ("count", 6)),
        ("128,64,64", ("list", (128, 64, 64))),
        ([128, 128], ("list", (128, 128))),
    ],
)
def test_parse_token_pipeline_slices(value, expected):
    assert parse_token_pipeline_slices(value) == expected


@pytest.mark.parametrize("value", ["0", "many", "12,x"])
def test_parse_token_pipeline_slices_rejects(value):
    with pytest.raises(ValueError, match="--token-pipeline-slices"):
        parse_token_pipeline_slices(value)


def megatron_args(**overrides):
    args = dict(
        num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=None,
        group_query_attention=False, ffn_hidden_size=None, seq_length=1024,
        micro_batch_size=1, global_batch_size=8, data_parallel_size=1,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=4, sequence_parallel=True,
        padded_vocab_size=50304, swiglu=False, virtual_pipeline_model_parallel_size=None,
        token_pipeline_slices="auto", token_pipeline_granularity=64,
        token_pipeline_cost_model="analytic:a100", token_pipeline_memory_cap=None,
        token_pipeline_schedule="terapipe",
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def test_plan_from_args_auto_plans_the_executor_micro_batches():
    result = plan_from_args(megatron_args())
    assert sum(result.token_slices) == 1024 and all(x % 64 == 0 for x in result.token_slices)
    assert result.batch_slices == (1,) * 8
    assert result.extra["num_microbatches"] == 8
    assert result.strategy.startswith("dp") and result.cost_model == "analytic:a100"
    # More micro-batches in flight weigh the bubble less: never more slices than with one.
    single = plan_from_args(megatron_args(), num_microbatches=1)
    assert single.num_token_slices >= result.num_token_slices


def test_plan_from_args_count_and_list():
    equal = plan_from_args(megatron_args(token_pipeline_slices="4"))
    assert equal.token_slices == (256,) * 4 and equal.strategy == "equal"
    assert equal.predicted_step_time > 0 and equal.t_max > 0
    explicit = plan_from_args(megatron_args(token_pipeline_slices="512,256,256"))
    assert explicit.token_slices == (512, 256, 256) and explicit.strategy == "explicit"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"token_pipeline_granularity": 100},
         r"--token-pipeline-granularity=100 does not divide --seq-length=1024; valid values: 2, 4"),
        ({"token_pipeline_granularity": 3, "seq_length": 1023},
         "--token-pipeline-granularity=3 must be a multiple of --tensor-model-parallel-size 2"),
        ({"token_pipeline_slices": "512,500"}, r"--token-pipeline-slices \[512, 500\] sum to"),
        ({"token_pipeline_slices": "511,513"}, "must be a multiple of 2"),
        ({"token_pipeline_memory_cap": 0.001}, r"no plan fits: smallest needs [\d.]+ GiB"),
        ({"token_pipeline_slices": "512,512", "token_pipeline_memory_cap": 0.001},
         r"needs [\d.]+ GiB of activations per stage, over --token-pipeline-memory-cap=0.001"),
        ({"token_pipeline_cost_model": "magic"}, "--token-pipeline-cost-model='magic'"),
        ({"token_pipeline_cost_model": "missing.npz"}, "missing.npz: no such file"),
    ],
)
def test_plan_from_args_errors_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_from_args(megatron_args(**overrides))


def test_plan_from_args_memory_cap_is_met():
    # terapipe (the default) holds every slice at its peak; only a thin last slice adds to it
    # (the first backward's K/V-gradient accumulators), so the cap sits between one slice's peak
    # and the thin-ended plan's.
    args = megatron_args(token_pipeline_granularity=32, global_batch_size=None,
                         token_pipeline_slices="992,32")
    thin = plan_from_args(args).extra["activation_memory_gib"]
    args.token_pipeline_slices = "1"
    one = plan_from_args(args).extra["activation_memory_gib"]
    assert one < thin
    args.token_pipeline_slices = "auto"
    args.token_pipeline_memory_cap = (one + thin) / 2
    capped = plan_from_args(args)
    assert capped.extra["activation_memory_gib"] <= args.token_pipeline_memory_cap
    args.token_pipeline_slices = "992,32"
    with pytest.raises(ValueError, match="over --token-pipeline-memory-cap"):
        plan_from_args(args)


def test_plan_from_args_reads_a_latency_table(tmp_path):
    table = np.full((2, 5, 5), np.inf)
    for n in range(1, 5):
        for c in range(0, 5 - n):
            table[1, n, c] = 1.0 + n + 0.1 * n * c
    np.savez(tmp_path / "t.npz", latency=table, granularity=256, seq_length=1024)
    args = megatron_args(token_pipeline_cost_model=str(tmp_path / "t.npz"),
                         token_pipeline_granularity=256, global_batch_size=None)
    result = plan_from_args(args)
    assert result.cost_model == "table:t.npz"
    model = LatencyTableCostModel.load(tmp_path / "t.npz")
    assert result.predicted_step_time == pytest.approx(
        min(sum(t) + 3 * max(t) for t in _all_slicings(model)))


def _all_slicings(model):
    for mask in range(8):
        cuts = [i for i in range(1, 4) if mask >> (i - 1) & 1]
        units = [b - a for a, b in zip([0, *cuts], [*cuts, 4])]
        offsets = np.cumsum([0, *units[:-1]])
        yield [model.latency[1, n, c] for n, c in zip(units, offsets)]


def test_broadcast_without_distributed_returns_the_plan():
    assert broadcast_plan(plan()) is not None
    with pytest.raises(ValueError, match="no plan"):
        broadcast_plan(None)
    lines = []
    got = plan_and_broadcast(megatron_args(), print_fn=lines.append)
    assert "token pipeline plan" in lines[0] and sum(got.token_slices) == 1024


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        out = {}
        for case, granularity in (("good", 64), ("bad", 100)):
            printed: list[str] = []
            try:
                args = megatron_args(token_pipeline_granularity=granularity)
                got = plan_and_broadcast(args, print_fn=printed.append).to_dict()
            except ValueError as exc:
                got = {"error": str(exc)}
            out[case] = (got, printed)
        # broadcast_plan alone: rank 1 passes nothing and receives rank 0's plan.
        out["plain"] = broadcast_plan(plan() if rank == 0 else None).to_dict()
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_rank_zero_plans_and_every_rank_gets_it_over_gloo():
    ctx = mp.get_context("spawn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert got[0]["plain"] == got[1]["plain"] == plan().to_dict()
    good0, good1 = got[0]["good"], got[1]["good"]
    assert good0[0] == good1[0] and sum(good1[0]["token_slices"]) == 1024
    assert good0[1] and not good1[1]  # only rank 0 prints
    assert got[0]["bad"][0] == got[1]["bad"][0]
    assert "does not divide" in got[1]["bad"][0]["error"]


def test_plan_from_args_scores_1f1b_schedules_with_the_simulator():
    from megatron_terapipe import simulate
    if not hasattr(simulate, "simulate"):
        pytest.skip("simulator not available")
    args = megatron_args(token_pipeline_schedule="token-1f1b", global_batch_size=2,
                         pipeline_model_parallel_size=2, token_pipeline_granularity=128)
    result = plan_from_args(args)
    assert result.extra["score"] == "simulator" and result.simulated
    assert result.predicted_step_time == result.simulated_step_time
    want, _ = predict_step_time(cost_model_from_args(args), result.token_slices, 2, (1, 1))
    assert result.objective == pytest.approx(want)  # the plan's own, not the DP's optimum
    assert result.extra["schedule"] == "token-1f1b"
    equal = plan_from_args(megatron_args(**dict(vars(args), token_pipeline_slices="2")))
    assert equal.extra["score"] == "simulator"


def test_plan_from_args_scores_split_backwards_as_the_split_schedule():
    """TeraPipe's formula is exact only for the unsplit terapipe schedule: with
    --token-pipeline-split-backward even terapipe is scored by the simulator on the split
    schedule, which is shorter than the unsplit one for the same slices."""
    base = dict(token_pipeline_schedule="terapipe", global_batch_size=1,
                pipeline_model_parallel_size=4, token_pipeline_granularity=128,
                token_pipeline_slices="4")
    plain = plan_from_args(megatron_args(**base))
    split = plan_from_args(megatron_args(**base, token_pipeline_split_backward=True))
    assert plain.extra["score"] == "formula" and "split_backward" not in plain.extra
    assert split.extra["score"] == "simulator" and split.extra["split_backward"] is True
    assert split.token_slices == plain.token_slices
    assert split.predicted_step_time < plain.predicted_step_time
    auto = plan_from_args(megatron_args(**dict(base, token_pipeline_slices="auto"),
                                        token_pipeline_split_backward=True))
    assert auto.extra["score"] == "simulator" and auto.extra["split_backward"] is True


def test_memory_model_prices_only_dense_layers():
    """MoE layers are not in the memory model: no number is printed for them, and a cap that
    could not be checked is refused by name (at argument time too)."""
    from megatron_terapipe.arguments import token_pipeline_errors

    args = megatron_args(num_experts=8)
    plan = plan_from_args(args)
    assert "activation_memory_gib" not in plan.extra
    args.token_pipeline_memory_cap = 1.0
    with pytest.raises(ValueError, match="--token-pipeline-memory-cap cannot be checked: "
                                         "--num-experts=8"):
        plan_from_args(args)
    args.token_pipeline = True
    assert any("--token-pipeline-memory-cap cannot be checked: --num-experts=8" in e
               for e in token_pipeline_errors(args)), token_pipeline_errors(args)
