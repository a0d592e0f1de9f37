"""Rank body: the single-stage sliced helper against the unsliced model on one process."""

from __future__ import annotations


def sliced_vs_unsliced(rank: int, world_size: int, token_slices: list[int], model_kwargs: dict):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_terapipe import token_pipeline_layer_spec
    from megatron_terapipe.model.single_stage import sliced_forward_backward
    from megatron_terapipe.testing.gpt import (
        TinyGPT,
        build_gpt_chunks,
        make_microbatches,
        transformer_config,
    )

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(3)
    spec = TinyGPT(**model_kwargs)
    model = build_gpt_chunks(
        spec, transformer_config(spec), token_pipeline_layer_spec(get_gpt_layer_local_spec())
    )[0]
    batch = make_microbatches(spec, 2, 1, seed=5)[0]

    def loss_of_slice(m, b):
        losses = m(b["tokens"], b["position_ids"], None, labels=b["labels"]).float()
        return (losses * b["loss_mask"]).sum(), b["loss_mask"].sum()

    sliced_loss = sliced_forward_backward(
        model, batch, token_slices, spec.seq_length, loss_of_slice
    )
    sliced = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole_sum, whole_count = loss_of_slice(model, batch)
    whole_loss = whole_sum / whole_count
    whole_loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(sliced, whole) if b.norm() > 0]
    return {"loss": (sliced_loss.item(), whole_loss.item()), "max_grad_error": max(errors)}
