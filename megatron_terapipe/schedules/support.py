"""Which megatron-core features the token pipeline supports; a clear error for the rest."""

from __future__ import annotations

from collections.abc import Sequence


def unsupported_features(config) -> list[str]:
    """Names of enabled features of a TransformerConfig that token slicing cannot run exactly."""
    problems = []
    if getattr(config, "context_parallel_size", 1) > 1:
        problems.append(
            f"context parallelism (context_parallel_size={config.context_parallel_size})"
        )
    if getattr(config, "num_moe_experts", None):
        problems.append(
            "MoE (num_moe_experts): routing capacity/token dropping and the load-balancing loss "
            "depend on the whole sequence"
        )
    if getattr(config, "mtp_num_layers", None):
        problems.append("multi-token prediction (mtp_num_layers)")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        problems.append("defer_embedding_wgrad_compute")
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        problems.append("overlap_moe_expert_parallel_comm")
    if getattr(config, "hybrid_context_parallel", False):
        problems.append("hybrid_context_parallel")
    if getattr(config, "variable_seq_lengths", False):
        problems.append("variable_seq_lengths")
    if getattr(config, "multi_latent_attention", False):
        problems.append("multi-latent attention")
    return problems


def check_token_pipeline_support(config, models: Sequence | None = None) -> None:
    """Raise ValueError naming every unsupported feature that is on."""
    problems = unsupported_features(config)
    for model in models or ():
        from megatron.core.enums import ModelType
        from megatron.core.utils import get_model_type

        if get_model_type(model) == getattr(ModelType, "encoder_and_decoder", None):
            problems.append("encoder-decoder models")
            break
    if problems:
        raise ValueError(
            "token pipeline does not support: " + "; ".join(problems) + ". Turn these off or "
            "use megatron-core's own schedules."
        )
