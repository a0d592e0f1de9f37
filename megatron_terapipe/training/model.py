"""Model provider: megatron-core GPTModel chunks wrapped in megatron-core DDP, as get_model does.

The one path from Megatron-LM flags (a validated `training.args` namespace) to GPTModel chunks:
the trainer, the benchmark and the demo all build their models here. The token pipeline
changes one thing: the layer spec's core attention (through `megatron_lm.layer_spec`).
Parameters, their order and initialisation are identical to the stock model's, which is why a
checkpoint saved under one schedule loads under the other.

Attention kernels (`attention_kernel`): ``local`` is megatron-core's DotProductAttention
(baddbmm + masked softmax over the whole s x s block), ``sdpa`` is torch's
scaled_dot_product_attention as the token-pipeline spec runs it (outside a token step it is
plain causal SDPA), ``transformer_engine`` is TE's fused attention. A stock run with
``--attention-backend flash`` builds the token-pipeline spec without the token schedule, so
stock and token schedules can be compared on the same kernel.
"""

from __future__ import annotations

from argparse import Namespace

import torch


def use_transformer_engine(args: Namespace) -> bool:
    return args.transformer_impl == "transformer_engine"


def transformer_config_from_args(args: Namespace):
    """megatron-core TransformerConfig for `args` (Megatron-LM's core_transformer_config_from_args):
    `model.transformer_config` with this run's flags, the one path every model config takes."""
    from megatron_terapipe.model.transformer_config import megatron_settings, transformer_config
    from megatron_terapipe.training.initialize import on_gpu

    return transformer_config(**megatron_settings(args), use_cpu_initialization=not on_gpu())


def base_layer_spec(args: Namespace):
    """The stock megatron-core GPT layer spec: TE when asked (and usable), else local."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    num_experts = getattr(args, "num_experts", None)
    if use_transformer_engine(args):
        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts)
    # MoE experts as SequentialMLP: grouped GEMM needs kernels the local path does not have
    return get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization=args.normalization
    )


def attention_kernel(args: Namespace) -> str:
    """Which core-attention kernel `layer_spec(args)` runs: local, sdpa or transformer_engine."""
    if use_transformer_engine(args):
        return "transformer_engine"
    if getattr(args, "token_pipeline", False):
        return "sdpa"
    if getattr(args, "attention_backend", None) == "flash":
        return "sdpa"
    return "local"


def built_attention_kernels(model: list) -> set[str]:
    """The core-attention kernels the built chunks actually hold (by module class), for
    reports that must say which kernel ran."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_terapipe.model.prefix_attention import PrefixKVAttention

    found = set()
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, PrefixKVAttention):
                found.add("sdpa")
            elif isinstance(module, DotProductAttention):
                found.add("local")
            elif type(module).__name__ == "TEDotProductAttention":
                found.add("transformer_engine")
    return found


def layer_spec(args: Namespace):
    """The layer spec this run builds: stock, or with prefix-KV (SDPA) core attention."""
    from megatron_terapipe import megatron_lm

    spec = megatron_lm.layer_spec(base_layer_spec(args), args)
    if attention_kernel(args) == "sdpa" and not getattr(args, "token_pipeline", False):
        from megatron_terapipe.model import token_pipeline_layer_spec

        spec = token_pipeline_layer_spec(spec)
    return spec


def build_model(args: Namespace, config, verbose: bool = True) -> list:
    """This rank's GPTModel chunks (one per virtual stage), fp16/bf16-wrapped, in DDP."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    from megatron_terapipe.training.initialize import on_gpu

    spec = layer_spec(args)
    vp_size = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            parallel_output=True,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base,
            vp_stage=stage,
        )
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunks.append(chunk)

    num_parameters = sum(p.nelement() for chunk in chunks for p in chunk.parameters())
    if verbose and parallel_state.get_data_parallel_rank() == 0:
        print(
            " > number of parameters on (tensor, pipeline) model parallel rank "
            f"({parallel_state.get_tensor_model_parallel_rank()}, "
            f"{parallel_state.get_pipeline_model_parallel_rank()}): {num_parameters}",
            flush=True,
        )
    if on_gpu():
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    if args.fp16 or args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or args.bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None,
    )
    return [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(index > 0)
        )
        for index, chunk in enumerate(chunks)
    ]


def attach_schedule_hooks(config, model: list, align_grad_reduce: bool = True) -> None:
    """What megatron-core's schedules call on `config` around a step: DDP's no_sync (grad
    accumulation across micro-batches), finalize_model_grads (grad all-reduce, tied
    embeddings) and, with --overlap-grad-reduce and aligned reduction, each chunk's
    start_grad_sync; Megatron-LM's train() sets the same."""
    from megatron.core.distributed import finalize_model_grads

    def per_chunk(funcs: list):
        return funcs[0] if len(funcs) == 1 else funcs

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk([chunk.no_sync for chunk in model])
    ddp_config = getattr(model[0], "ddp_config", None)
    if ddp_config is not None and ddp_config.overlap_grad_reduce and align_grad_reduce:
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in model])
