"""The one place a megatron-core TransformerConfig is built, from Megatron-LM's settings.

The trainer (from its parsed flags), the benchmark, the tests' reference models, the GPU check
and the slice-cost profiler all build their configs here, so a model that one of them trains
is the model the others measure and compare against. The keyword parameters are Megatron-LM's
argument names (the `dest` of each pretrain_gpt.py flag), so `megatron_settings(args)` maps a
parsed namespace onto them by name; what has no flag here goes to megatron-core verbatim as a
TransformerConfig field (`**config_fields`).

Point-to-point mode of megatron-core's interleaved schedule (virtual pipeline stages): always
overlapped, un-batched P2P (`overlap_p2p_comm=True, batch_p2p_comm=False`), Megatron-LM's
default for interleaving. It is the mode megatron-core supports at every pipeline size, on
gloo as on NCCL. With two pipeline ranks the send to the next and the send to the previous
stage go to the same peer: megatron-core's un-batched path posts the two directions on two
process groups, so they cannot be paired with each other, while the batched mode puts both
into one `batch_isend_irecv`, where gloo pairs same-peer messages in posting order, which
differs between the two ends, so equal-shaped activations and gradients are swapped silently
(Megatron-LM refuses batched P2P with two pipeline ranks, on NCCL too).
tests/test_stock_reference.py pins both: interleaved runs at PP 2 and PP 4 equal the
unpipelined reference, the batched mode at PP 2 does not. The overlapped mode's one hazard
is an output deallocated while its asynchronous send still reads it; where megatron-core's
interleaved schedule does not wait for that send (before 0.18, `compat.megatron_core`),
outputs stay allocated under virtual stages. Non-interleaved schedules keep megatron-core's
batched default: megatron-core refuses overlapped P2P there.
"""

from __future__ import annotations

import inspect
from argparse import Namespace
from typing import Any

import torch
import torch.nn.functional as F

# Megatron-LM's settings for stock interleaving (see the module docstring).
INTERLEAVED_P2P = {"overlap_p2p_comm": True, "batch_p2p_comm": False}


def transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
    kv_channels: int | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    fp16: bool = False,
    params_dtype: torch.dtype | None = None,
    hidden_dropout: float = 0.1,
    attention_dropout: float = 0.1,
    init_method_std: float = 0.02,
    normalization: str = "LayerNorm",
    norm_epsilon: float = 1e-5,
    add_bias_linear: bool = True,
    swiglu: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    use_cpu_initialization: bool = True,
    gradient_accumulation_fusion: bool = False,
    num_experts: int | None = None,
    moe_router_topk: int = 2,
    moe_ffn_hidden_size: int | None = None,
    moe_shared_expert_intermediate_size: int | None = None,
    moe_router_load_balancing_type: str = "aux_loss",
    moe_aux_loss_coeff: float = 0.0,
    moe_z_loss_coeff: float | None = None,
    moe_router_score_function: str = "softmax",
    moe_router_enable_expert_bias: bool = False,
    moe_token_dispatcher_type: str = "allgather",
    moe_expert_capacity_factor: float | None = None,
    moe_pad_expert_input_to_capacity: bool = False,
    **config_fields: Any,
) -> Any:
    """megatron-core's TransformerConfig for these Megatron-LM settings.

    What Megatron-LM's `core_transformer_config_from_args` derives is derived the same way:
    the parameter dtype from --bf16/--fp16 (unless `params_dtype` is given: the profiler
    measures a dtype, not a run), --swiglu as a SiLU-gated MLP, --norm-epsilon as the
    LayerNorm/RMSNorm epsilon, --recompute-granularity full with the default of one layer per
    recompute unit, --num-experts with the expert FFN size defaulting to --ffn-hidden-size,
    and the interleaved schedule's P2P mode (module docstring). Pipeline outputs are
    deallocated once sent, as Megatron-LM does. Fused kernels stay off (they need apex or TE
    builds; the unfused paths run everywhere), except the weight-gradient accumulation
    fusion, which is on when asked and megatron-core has its kernel (apex on a GPU, compat's
    equivalent on the CPU). `use_cpu_initialization` draws each weight whole on the CPU and
    splits it, so every parallel layout starts from the same global weights; GPU runs pass
    False. Every setting given is applied (the MoE ones too, whether the expert count comes
    as --num-experts or as the num_moe_experts field), so none is silently dropped.
    `config_fields` are TransformerConfig fields set verbatim, last.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if params_dtype is None:
        params_dtype = torch.bfloat16 if bf16 else (torch.float16 if fp16 else torch.float32)
    if recompute_granularity == "full" and recompute_num_layers is None:
        recompute_num_layers = 1
    # An MoE model is asked for by --num-experts or, as a TransformerConfig field, by
    # num_moe_experts; the MoE settings below apply either way (for a dense model they are
    # megatron-core's defaults).
    if num_experts is not None and "num_moe_experts" in config_fields:
        raise ValueError("give the expert count once: num_experts or num_moe_experts")
    experts = config_fields.get("num_moe_experts", num_experts)
    if experts is not None and moe_ffn_hidden_size is None:
        moe_ffn_hidden_size = ffn_hidden_size
    fields: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        kv_channels=kv_channels,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=init_method_std,
        normalization=normalization,
        layernorm_epsilon=norm_epsilon,
        add_bias_linear=add_bias_linear,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        deallocate_pipeline_outputs=True,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=(
            gradient_accumulation_fusion and _grad_accum_kernel_available()
        ),
        num_moe_experts=num_experts,
        moe_router_topk=moe_router_topk,
        moe_ffn_hidden_size=moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
        moe_router_load_balancing_type=moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        moe_z_loss_coeff=moe_z_loss_coeff,
        moe_router_score_function=moe_router_score_function,
        moe_router_enable_expert_bias=moe_router_enable_expert_bias,
        moe_token_dispatcher_type=moe_token_dispatcher_type,
        moe_expert_capacity_factor=moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=moe_pad_expert_input_to_capacity,
    )
    if virtual_pipeline_model_parallel_size:
        from megatron_terapipe.compat.megatron_core import (
            INTERLEAVED_SCHEDULE_WAITS_FOR_SEND_BEFORE_DEALLOCATING,
        )

        fields.update(INTERLEAVED_P2P)
        fields["deallocate_pipeline_outputs"] = (
            INTERLEAVED_SCHEDULE_WAITS_FOR_SEND_BEFORE_DEALLOCATING
        )
    fields.update(config_fields)
    return TransformerConfig(**fields)


def _grad_accum_kernel_available() -> bool:
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


# Parameters of `transformer_config` that are not a Megatron-LM flag of the same meaning: the
# caller decides them (a namespace's `params_dtype` is a name, not a torch dtype).
_NOT_FLAGS = frozenset({"params_dtype", "use_cpu_initialization"})


def megatron_settings(args: Namespace | Any) -> dict[str, Any]:
    """The `transformer_config` keywords that `args` (a parsed Megatron-LM namespace, or any
    object whose attributes carry Megatron-LM's argument names) holds, by name."""
    names = [
        name
        for name, param in inspect.signature(transformer_config).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_FLAGS
    ]
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
