"""The contention probe (benchmark.contention): a stage's forward and backward without P2P.

What it times must be the stage's real work: on one stage (embedding, layers and loss) its
gradients are megatron-core's own no-pipelining forward-backward of the same micro-batch
(fp32, 1e-6); on two stages every parameter of each stage gets a gradient and the probe's
rounds and factors come back per stage."""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_terapipe.benchmark.contention import contention_factors, contention_note
from megatron_terapipe.compat import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "64", "--vocab-size", "64"]


def _spec(pp: int):
    spec = importlib.util.spec_from_file_location(
        "bench_step", os.path.join(ROOT, "scripts", "bench_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args([*TINY, "--pipeline-model-parallel-size", str(pp), "--no-auto",
                             "--no-local-attention", "--num-token-slices", "2"])
    return bench.spec_for(args, 1)


def _grads(chunk):
    return {name: p.main_grad.clone() for name, p in chunk.named_parameters()}


def _probe_against_megatron(rank: int, world_size: int, spec) -> dict:
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_terapipe.benchmark.batches import synthetic_microbatches
    from megatron_terapipe.benchmark.contention import StageProbe, probe_round
    from megatron_terapipe.benchmark.models import build_model
    from megatron_terapipe.training.data import forward_step

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    built = build_model(spec.model, "sdpa")
    chunk = built.chunks[0]
    (batch,) = synthetic_microbatches(spec.model.vocab_size, 64, 1, 1, seed=3)
    probe = StageProbe(chunk, batch, spec.model.hidden_size)
    chunk.zero_grad_buffer()
    probe.run()
    probed = _grads(chunk)
    out = {"nonzero": {n: bool(g.abs().sum() > 0) for n, g in probed.items()}}
    if world_size == 1:
        chunk.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=chunk,
            num_microbatches=1, seq_length=64, micro_batch_size=1, forward_only=False)
        reference = _grads(chunk)
        out["max_diff"] = max(float((probed[n] - reference[n]).abs().max()) for n in probed)
    else:
        group = parallel_state.get_pipeline_model_parallel_group()
        out["round"] = probe_round(probe, group)
    return out


def test_one_stage_probe_has_megatron_cores_gradients():
    (out,) = run_distributed(_probe_against_megatron, 1, _spec(1), timeout_s=300.0)
    assert all(out["nonzero"].values())
    assert out["max_diff"] < 1e-6


def test_every_stage_probe_computes_its_whole_stage():
    results = run_distributed(_probe_against_megatron, 2, _spec(2), timeout_s=300.0)
    for out in results:
        assert out["nonzero"] and all(out["nonzero"].values())
        alone, together = out["round"]
        assert alone > 0 and together > 0


def test_factors_are_median_together_over_median_alone():
    factors = contention_factors([[1.0, 2.0, 1.1], [2.0, 2.0, 2.0]],
                                 [[1.2, 1.3, 9.0], [2.0, 2.2, 1.8]])
    assert factors == pytest.approx([1.3 / 1.1, 1.0])
    assert "1.18/1.00x its time alone" in contention_note(factors)
