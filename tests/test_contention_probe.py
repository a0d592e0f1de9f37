"""The contention probe (benchmark.contention): a stage's forward and backward without P2P.

What it times must be the stage's real work: its gradients are megatron-core's own for the
same micro-batch (fp32, 1e-6) on one stage (no-pipelining) and on both stages of PP = 2 (1F1B,
M = 1) when the probe is handed the tensors the other stage really sends; with bf16 it runs
on the pipeline's dtype; the probe's rounds and factors come back per stage."""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_terapipe.benchmark.contention import contention_factors, contention_note
from megatron_terapipe.compat import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "64", "--vocab-size", "64"]


def _spec(pp: int, *extra: str):
    spec = importlib.util.spec_from_file_location(
        "bench_step", os.path.join(ROOT, "scripts", "bench_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args([*TINY, "--pipeline-model-parallel-size", str(pp), "--no-auto",
                             "--no-local-attention", "--num-token-slices", "2", *extra])
    return bench.spec_for(args, 1)


def _grads(chunk):
    return {name: p.main_grad.clone() for name, p in chunk.named_parameters()}


def _probe_against_megatron(rank: int, world_size: int, spec) -> dict:
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_terapipe.benchmark.contention import StageProbe, probe_round
    from megatron_terapipe.benchmark.models import build_model
    from megatron_terapipe.model.synthetic_batches import synthetic_microbatches
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


def _probe_with_real_p2p_tensors(rank: int, world_size: int, spec) -> dict:
    """PP = 2: megatron-core's 1F1B at M = 1, then the probe on each stage fed what the other
    stage sends (stage 0's output, stage 1's gradient of it)."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_terapipe.benchmark.contention import StageProbe
    from megatron_terapipe.benchmark.models import build_model
    from megatron_terapipe.model.synthetic_batches import synthetic_microbatches
    from megatron_terapipe.training.data import forward_step

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    chunk = build_model(spec.model, "sdpa").chunks[0]
    (batch,) = synthetic_microbatches(spec.model.vocab_size, 64, 1, 1, seed=3)
    chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunk,
        num_microbatches=1, seq_length=64, micro_batch_size=1, forward_only=False)
    reference = _grads(chunk)

    probe = StageProbe(chunk, batch, spec.model.hidden_size)
    group = parallel_state.get_pipeline_model_parallel_group()
    peer = torch.distributed.get_global_rank(group, 1 - rank)
    chunk.zero_grad_buffer()
    if rank == 0:
        with torch.no_grad():
            sent, _ = forward_step(iter([batch]), chunk)
        torch.distributed.send(sent.contiguous(), peer)
        torch.distributed.recv(probe.output_grad, peer)
        probe.run()
    else:
        torch.distributed.recv(probe.hidden, peer)
        probe.run()
        torch.distributed.send(probe.received.grad.contiguous(), peer)
    probed = _grads(chunk)
    # Tied embeddings: megatron-core's finalize_model_grads (part of its step, not the probe's
    # work) adds the two stages' gradients of the shared weight; do the same here.
    tied = next(n for n in probed if n.endswith(("word_embeddings.weight", "output_layer.weight")))
    other = torch.empty_like(probed[tied])
    if rank == 0:
        torch.distributed.send(probed[tied], peer)
        torch.distributed.recv(other, peer)
    else:
        torch.distributed.recv(other, peer)
        torch.distributed.send(probed[tied], peer)
    probed[tied] += other
    return {"max_diff": max(float((probed[n] - reference[n]).abs().max()) for n in probed),
            "scale": max(float(g.abs().max()) for g in reference.values())}


def _probe_round_bf16(rank: int, world_size: int, spec) -> dict:
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_terapipe.benchmark.contention import StageProbe, probe_round
    from megatron_terapipe.benchmark.models import build_model
    from megatron_terapipe.model.synthetic_batches import synthetic_microbatches

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    chunk = build_model(spec.model, "sdpa").chunks[0]
    (batch,) = synthetic_microbatches(spec.model.vocab_size, 64, 1, 1, seed=3)
    probe = StageProbe(chunk, batch, spec.model.hidden_size)
    chunk.zero_grad_buffer()
    alone, together = probe_round(probe, parallel_state.get_pipeline_model_parallel_group())
    return {"dtype": str(probe.hidden.dtype), "seconds": (alone, together),
            "nonzero": all(bool(p.main_grad.abs().sum() > 0) for p in chunk.parameters())}


def test_pipeline_stage_probes_have_megatron_cores_1f1b_gradients():
    results = run_distributed(_probe_with_real_p2p_tensors, 2, _spec(2), timeout_s=300.0)
    for out in results:
        assert out["scale"] > 0 and out["max_diff"] < 1e-6


def test_bf16_probe_runs_on_the_pipeline_dtype():
    results = run_distributed(_probe_round_bf16, 2, _spec(2, "--bf16"), timeout_s=300.0)
    for out in results:
        assert out["dtype"] == "torch.bfloat16" and out["nonzero"]
        assert min(out["seconds"]) > 0


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
    alone, together = [[1.0, 2.0, 1.1], [2.0, 2.0, 2.0]], [[1.2, 1.3, 9.0], [2.0, 2.2, 1.8]]
    factors = contention_factors(alone, together)
    assert factors == pytest.approx([1.3 / 1.1, 1.0])
    probe = {"factor": factors, "alone_s": alone, "together_s": together}
    one = contention_note(probe, 1)
    assert "1.18/1.00x its time alone" in one and "NOISY" in one and "M = 1 never" in one
    assert "at M = 4 stock 1F1B's steady state" in contention_note(probe, 4)
    steady = {"factor": [1.0], "alone_s": [[1.0, 1.01]], "together_s": [[1.0, 1.01]]}
    assert "NOISY" not in contention_note(steady, 1)
