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
import torch.nn.functional as F


def use_transformer_engine(args: Namespace) -> bool:
    return args.transformer_impl == "transformer_engine"


def transformer_config_from_args(args: Namespace):
    """megatron-core TransformerConfig for `args` (Megatron-LM's core_transformer_config_from_args
    for the flags this trainer has)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.params_dtype, torch.float32
    )
    from megatron_terapipe.training.initialize import on_gpu

    on_cpu = not on_gpu()
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=args.add_bias_linear,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        deallocate_pipeline_outputs=True,
        # Fused kernels need apex/TE builds; the unfused paths are what runs everywhere.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=gradient_accumulation_fusion(args),
        persist_layer_norm=False,
    )
    if args.virtual_pipeline_model_parallel_size:
        # Batched P2P (Megatron-LM's --no-overlap-p2p-communication). The overlapped mode gave
        # different losses from the batched mode and from the token executor on CPU/gloo
        # (PP=4, VP=2), so the trainer does not use it; batched needs PP > 2 for stock
        # interleaving (validated in args.py).
        kwargs.update(overlap_p2p_comm=False, batch_p2p_comm=True)
    if args.recompute_granularity == "full" and args.recompute_num_layers is None:
        kwargs["recompute_num_layers"] = 1
    if getattr(args, "num_experts", None) is not None:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
            expert_model_parallel_size=args.expert_model_parallel_size,
        )
    return TransformerConfig(**kwargs)


def gradient_accumulation_fusion(args: Namespace) -> bool:
    """Megatron-LM's --gradient-accumulation-fusion (on unless --no-...), where megatron-core
    has the weight-gradient accumulation kernel (apex on GPUs, compat's CPU equivalent)."""
    if not getattr(args, "gradient_accumulation_fusion", True):
        return False
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


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
