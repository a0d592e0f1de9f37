"""Rank bodies for the loss-semantics tests: stock and token schedules on the *same* model.

Both schedules run on one set of ranks, on one model instance and the same micro-batches, so any
difference in losses, reports or gradients comes from the schedule alone.
"""

from __future__ import annotations

import contextlib
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
    # An MoE model gets megatron-core's MoE layer spec (SequentialMLP experts: no grouped GEMM
    # on the CPU); the token-pipeline spec swaps in its router, which is stock's outside slicing.
    num_experts = model.config_overrides.get("num_moe_experts")
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    chunks = build_gpt_chunks(model, config, token_pipeline_layer_spec(spec))
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


def _names(model) -> list[str]:
    """Parameter names in `_grads` order, so tests can pick out the router or the experts."""
    return [name for name, _ in model.named_parameters()]


@contextlib.contextmanager
def _recording_routing(record: dict):
    """Within: every MoE routing call adds its routing map to `record["routing"][layer]`, in
    call order. A token whose k-th and (k+1)-th router logits lie within rounding of each other
    can go to another expert under bf16 rounding alone; the bf16 test compares gradient errors
    only where no token did, since one such token moves whole expert gradients."""
    from megatron.core.transformer.moe.router import TopKRouter

    stock_routing = TopKRouter.routing

    def routing(self, logits, *args, **kwargs):
        probs, routing_map = stock_routing(self, logits, *args, **kwargs)
        record.setdefault("routing", {}).setdefault(self.layer_number, []).append(
            routing_map.detach().reshape(-1, routing_map.shape[-1]).clone())
        return probs, routing_map

    TopKRouter.routing = routing
    try:
        yield
    finally:
        TopKRouter.routing = stock_routing


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
    data_seed: int = 3,
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
    batches = make_microbatches(model_spec, 1, num_microbatches, seed=data_seed)
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
    moe = "num_moe_experts" in model_spec.config_overrides
    for name, func, model in runs:
        model.zero_grad_buffer()
        record: dict = {}
        with _recording_routing(record) if moe else contextlib.nullcontext():
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
            "names": _names(model),
            # MoE: per layer, the routing of every token in forward order (micro-batches, and
            # slices within them, in sequence order)
            "routing": {
                layer: torch.cat(maps) for layer, maps in record.get("routing", {}).items()
            },
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
            overrides = (case.get("model_kwargs") or {}).get("config_overrides", {})
            if "num_moe_experts" in overrides:
                from megatron_terapipe.compat.megatron_core import reset_moe_metrics

                reset_moe_metrics()  # the aux-loss tracker is sized by this model's layers
    return results
