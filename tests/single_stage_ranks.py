"""Rank body: the single-stage sliced helper against the unsliced model on one process."""

from __future__ import annotations

import torch


def sliced_vs_unsliced(
    rank: int,
    world_size: int,
    token_slices: list[int],
    model_kwargs: dict,
    document_ends: list[int] | None = None,
):
    """With `document_ends`, those positions hold an EOD token and the batch carries
    megatron-core's document attention mask and reset position ids (--reset-attention-mask
    --reset-position-ids); the result then also holds the stock local-spec model's loss and
    gradients (same weights) as a second reference."""
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
    if document_ends:
        batch = _with_documents(batch, document_ends, eod=spec.vocab_size - 1)

    def loss_of_slice(m, b):
        mask = b.get("attention_mask")
        losses = m(b["tokens"], b["position_ids"], mask, labels=b["labels"]).float()
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
    result = {
        "loss": (sliced_loss.item(), whole_loss.item()),
        "max_grad_error": _error(sliced, whole),
    }
    if document_ends:
        stock = build_gpt_chunks(spec, transformer_config(spec), get_gpt_layer_local_spec())[0]
        stock.load_state_dict(model.state_dict())
        stock_sum, stock_count = loss_of_slice(stock, batch)
        (stock_sum / stock_count).backward()
        result["stock_loss"] = (stock_sum / stock_count).item()
        result["max_grad_error_vs_stock"] = _error(sliced, [p.grad for p in stock.parameters()])
        unmasked = dict(batch, attention_mask=None)
        with torch.no_grad():
            plain_sum, plain_count = loss_of_slice(stock, unmasked)
        result["loss_without_document_mask"] = (plain_sum / plain_count).item()
    return result


def _error(actual, expected) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(actual, expected) if b.norm() > 0)


def _with_documents(batch: dict, document_ends: list[int], eod: int) -> dict:
    """`batch` whose tokens end documents at `document_ends`, with megatron-core's own
    document mask [b, 1, s, s] and reset position ids (what GPTDataset builds)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = batch["tokens"].clone()
    tokens[:, document_ends] = eod
    masks, positions = [], []
    for row in tokens:
        mask, _, position_ids = _get_ltor_masks_and_position_ids(row, eod, True, True, False, True)
        masks.append(mask)
        positions.append(position_ids)
    return dict(
        batch,
        tokens=tokens,
        attention_mask=torch.stack(masks),
        position_ids=torch.stack(positions),
    )
