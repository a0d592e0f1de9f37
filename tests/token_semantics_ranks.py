"""Rank bodies for the loss-semantics tests: stock and token schedules on the *same* model.

Both schedules run on one set of ranks, on one model instance and the same micro-batches, so any
difference in losses, reports or gradients comes from the schedule alone.
"""

from __future__ import annotations

from functools import partial

import torch


def _build(pipeline_parallel: int, model_kwargs: dict, config_kwargs: dict):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pipeline_parallel)
    return _model(pipeline_parallel, model_kwargs, config_kwargs)


def _model(pipeline_parallel: int, model_kwargs: dict, config_kwargs: dict):
    from megatron.core import tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_terapipe import token_pipeline_layer_spec
    from megatron_terapipe.testing.gpt import TinyGPT, build_gpt_chunks, transformer_config

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    model = TinyGPT(**model_kwargs)
    config = transformer_config(model, pipeline_parallel=pipeline_parallel, **config_kwargs)
    chunks = build_gpt_chunks(model, config, token_pipeline_layer_spec(get_gpt_layer_local_spec()))
    if model.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp = [
        DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), c)
        for c in chunks
    ]
    config.no_sync_func = ddp[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def _grads(model) -> list[torch.Tensor]:
    return [p.main_grad.detach().clone() for p in model.parameters()]


def _ones_mask_loss(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    loss = losses.mean()
    return loss, {"lm loss": loss.clone().detach()}


def _forward_step(loss_kind: str, data_iterator, model):
    from megatron_terapipe.testing.gpt import loss_func_per_token

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    if loss_kind == "two":
        return output, partial(_ones_mask_loss, batch["loss_mask"])
    if loss_kind == "non_loss":

        def collect(output_tensor, non_loss_data=False):
            assert non_loss_data
            return output_tensor.detach().clone()

        return output, collect
    return output, partial(loss_func_per_token, batch["loss_mask"])


def stock_vs_token(
    rank: int,
    world_size: int,
    schedule: str,
    token_slices: list[int],
    num_microbatches: int,
    loss_kind: str = "three",
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    config_kwargs: dict | None = None,
    model_kwargs: dict | None = None,
    fp32_reference: bool = False,
):
    """Run one step with megatron-core's schedule, then one with ours; return both outcomes.

    With `fp32_reference`, also stock's gradients of an fp32 copy of the (bf16) model: same
    weights, same micro-batches, as "reference".
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func as stock_func

    from megatron_terapipe import TokenPipelineConfig, get_forward_backward_func
    from megatron_terapipe.testing.gpt import make_microbatches

    model_spec, ddp = _build(world_size, model_kwargs or {}, config_kwargs or {})
    batches = make_microbatches(model_spec, 1, num_microbatches, seed=3)
    outcomes = {}
    token_func = get_forward_backward_func(
        TokenPipelineConfig(schedule=schedule, token_slices=token_slices)
    )
    runs = [("stock", stock_func(), ddp[0]), ("token", token_func, ddp[0])]
    if fp32_reference:
        _, fp32 = _model(world_size, {**(model_kwargs or {}), "bf16": False}, config_kwargs or {})
        with torch.no_grad():
            for target, source in zip(fp32[0].parameters(), ddp[0].parameters()):
                target.copy_(source.float())
        runs.append(("reference", stock_func(), fp32[0]))
    for name, func, model in runs:
        model.zero_grad_buffer()
        data = func(
            forward_step_func=partial(_forward_step, loss_kind),
            data_iterator=iter(list(batches)),
            model=model,
            num_microbatches=num_microbatches,
            seq_length=model_spec.seq_length,
            micro_batch_size=1,
            forward_only=forward_only,
            collect_non_loss_data=collect_non_loss_data,
        )
        outcomes[name] = {
            "data": data if parallel_state.is_pipeline_last_stage() else None,
            "grads": None if forward_only else _grads(model),
        }
    return outcomes


def stock_vs_token_many(rank: int, world_size: int, cases: list[dict]) -> list:
    """Several `stock_vs_token` runs in the same processes (start-up costs seconds per spawn)."""
    from megatron.core import parallel_state

    results = []
    for case in cases:
        try:
            results.append(stock_vs_token(rank, world_size, **case))
        finally:
            parallel_state.destroy_model_parallel()
    return results
