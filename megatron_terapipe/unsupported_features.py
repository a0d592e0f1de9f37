"""The megatron-core features the token pipeline cannot run exactly: one table, two checks.

Each row says how to see the feature on Megatron-LM's argument namespace (checked at argument
time, before torch is imported, by `arguments.token_pipeline_errors`) and on a megatron-core
TransformerConfig (checked by `schedules.support.check_token_pipeline_support` when the
executor is built), which flag turns it on, and why token slicing cannot honour it. Keeping
both checks on one table means a feature rejected on the command line is also rejected for a
user who builds the config in Python, with the same flag name in both messages.

Plain Python only: `arguments.py` imports this before torch loads.

The audit behind the table (megatron-core's `TransformerConfig` and every `ModelParallelConfig`
field of the releases supported) is written up in docs/gpu.md ("Unsupported features").
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One attribute that turns a feature on: `attr` on args or config, on when `is_on(value)`."""

    attr: str
    is_on: Callable[[Any], bool] = bool
    # the megatron-core release that introduced the attribute, when it is newer than the
    # oldest supported one (absent attributes are simply off on older releases)
    since: str | None = None
    # a condition on the whole namespace or config that must hold too (a combination of
    # settings is what cannot be honoured)
    only_if: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class UnsupportedFeature:
    name: str
    flag: str  # the Megatron-LM flag(s) that turn it on, as users type them
    reason: str
    on_args: tuple[Setting, ...]  # Megatron-LM namespace attributes (empty: no such flag)
    on_config: tuple[Setting, ...]  # TransformerConfig attributes (empty: not in the config)


def _above_one(value: Any) -> bool:
    return value is not None and value > 1


def _not_none(value: Any) -> bool:
    return value is not None


def _positive(value: Any) -> bool:
    return bool(value) and value > 0


def _cuda_graph_impl(value: Any) -> bool:
    return value not in (None, "none")


def _softmax_type(value: Any) -> bool:
    return value not in (None, "vanilla")


def _position_type(value: Any) -> bool:
    return value in ("relative", "mrope")


_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def _load_balancing_types(obj: Any) -> list:
    types = getattr(obj, "moe_router_load_balancing_type", None)
    return list(types) if isinstance(types, (list, tuple)) else [types]


def _routes_by(*kinds: str) -> Callable[[Any], bool]:
    def is_on(value: Any) -> bool:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return any(v in kinds for v in values)

    return is_on


def _moe_microbatch_terms(obj: Any) -> bool:
    """An MoE model whose router forms a z-loss or a load-balancing loss over its call's tokens."""
    if getattr(obj, "num_moe_experts", None) is None and getattr(obj, "num_experts", None) is None:
        return False
    if getattr(obj, "moe_z_loss_coeff", None) is not None:
        return True
    types = _load_balancing_types(obj)
    coeffs = getattr(obj, "moe_aux_loss_coeff", 0.0)
    coeffs = list(coeffs) if isinstance(coeffs, (list, tuple)) else [coeffs] * len(types)
    return any(t in _AUX_LOSS_TYPES and (c or 0) > 0 for t, c in zip(types, coeffs))


def _same(*settings: Setting) -> dict[str, tuple[Setting, ...]]:
    return {"on_args": settings, "on_config": settings}


_FIXED_SHAPES = (
    "it is set up for one fixed [sequence x batch] shape per layer call, while token slices "
    "have other lengths and the key/value prefix grows slice by slice"
)

UNSUPPORTED_FEATURES: tuple[UnsupportedFeature, ...] = (
    UnsupportedFeature(
        "context parallelism",
        "--context-parallel-size",
        "context parallelism already splits the sequence; use --context-parallel-size 1",
        **_same(Setting("context_parallel_size", _above_one)),
    ),
    UnsupportedFeature(
        "hybrid context parallelism",
        "--hybrid-context-parallel",
        "it splits the sequence across ranks by length, per step",
        **_same(Setting("hybrid_context_parallel")),
    ),
    UnsupportedFeature(
        "MoE token dropping (expert capacity)",
        "--moe-expert-capacity-factor / --moe-pad-expert-input-to-capacity",
        "an expert's capacity is a fraction of the tokens of one router call and the tokens "
        "dropped are the lowest-scored of that call, so a slice keeps or drops other tokens than "
        "the whole sequence would; use dropless routing (no capacity factor)",
        **_same(
            Setting("moe_expert_capacity_factor", _not_none),
            Setting("moe_pad_expert_input_to_capacity"),
        ),
    ),
    UnsupportedFeature(
        "MoE rank-level token dropping",
        "--moe-expert-rank-capacity-factor",
        "the capacity is a fraction of one router call's tokens, per slice instead of per sequence",
        **_same(Setting("moe_expert_rank_capacity_factor", _not_none, since="0.19.0")),
    ),
    UnsupportedFeature(
        "legacy MoE token dropping",
        "--moe-token-dropping",
        "it drops tokens by capacity over one router call",
        **_same(Setting("moe_token_dropping")),
    ),
    UnsupportedFeature(
        "Sinkhorn / quantile-balancing MoE routing",
        "--moe-router-load-balancing-type sinkhorn / quantile_balancing",
        "the experts a token gets depend on every token of the router call (Sinkhorn normalises "
        "the scores over them, quantile balancing takes per-expert quantiles of them), so a "
        "slice routes differently than the whole sequence; use aux_loss, seq_aux_loss, "
        "global_aux_loss or none (with or without --moe-router-enable-expert-bias)",
        **_same(
            Setting("moe_router_load_balancing_type", _routes_by("sinkhorn", "quantile_balancing"))
        ),
    ),
    UnsupportedFeature(
        "random MoE router inputs",
        "--moe-input-jitter-eps / --moe-router-force-load-balancing",
        "the noise (or the random logits) is drawn per router call, so slices draw other "
        "numbers than the whole sequence does",
        **_same(
            Setting("moe_input_jitter_eps", _not_none),
            Setting("moe_router_force_load_balancing"),
        ),
    ),
    UnsupportedFeature(
        "MoE routing replay",
        "--moe-enable-routing-replay",
        "it records and replays the routing of each router call, which is one per slice here",
        **_same(Setting("moe_enable_routing_replay")),
    ),
    UnsupportedFeature(
        "MoE flex token dispatcher (DeepEP / HybridEP)",
        "--moe-token-dispatcher-type flex",
        "its kernels need CUDA and have not been checked against stock under token slicing; use "
        "the alltoall or allgather dispatcher",
        **_same(Setting("moe_token_dispatcher_type", _routes_by("flex"))),
    ),
    UnsupportedFeature(
        "MoE paged stash",
        "--moe-paged-stash",
        "megatron-core's schedules reset the stash once per step of whole micro-batches; the "
        "token schedules do not",
        **_same(Setting("moe_paged_stash", since="0.19.0")),
    ),
    UnsupportedFeature(
        "MoE load-balancing or z-loss with the router recomputed",
        "--recompute-granularity full / --recompute-modules moe / --moe-layer-recompute",
        "the token pipeline forms these losses once the micro-batch's last slice has run its "
        "forward, but a recomputed router runs its forward again inside each slice's backward, "
        "last slice first; recompute other modules, or turn the losses off",
        **_same(
            Setting("recompute_granularity", lambda v: v == "full", only_if=_moe_microbatch_terms),
            Setting(
                "recompute_modules",
                lambda v: bool(v) and "moe" in v,
                only_if=_moe_microbatch_terms,
            ),
            Setting("moe_layer_recompute", only_if=_moe_microbatch_terms),
        ),
    ),
    UnsupportedFeature(
        "MoE expert-parallel communication overlap",
        "--overlap-moe-expert-parallel-comm",
        "it needs megatron-core's combined 1F1B schedule of whole micro-batches",
        **_same(Setting("overlap_moe_expert_parallel_comm")),
    ),
    UnsupportedFeature(
        "delayed weight-gradient computation",
        "--delay-wgrad-compute",
        "weight gradients are deferred to a point of megatron-core's own (MoE overlap) schedule "
        "that the token schedules do not have",
        **_same(Setting("delay_wgrad_compute")),
    ),
    UnsupportedFeature(
        "multi-token prediction",
        "--mtp-num-layers",
        "its extra heads read tokens beyond the current slice",
        **_same(Setting("mtp_num_layers")),
    ),
    UnsupportedFeature(
        "multi-latent attention",
        "--multi-latent-attention",
        "prefix-KV attention replaces the standard core attention only",
        **_same(Setting("multi_latent_attention")),
    ),
    UnsupportedFeature(
        "experimental attention variants (gated delta net, DSA)",
        "--experimental-attention-variant",
        "linear-attention state and the sparse-attention indexer span the whole sequence; "
        "prefix-KV attention is softmax attention only",
        **_same(Setting("experimental_attention_variant", _not_none)),
    ),
    UnsupportedFeature(
        "sliding-window attention",
        "--window-size",
        "prefix-KV attention is full causal attention",
        **_same(Setting("window_size", _not_none)),
    ),
    UnsupportedFeature(
        "non-vanilla softmax (attention sinks)",
        "--softmax-type",
        "prefix-KV attention implements the vanilla softmax only",
        **_same(Setting("softmax_type", _softmax_type)),
    ),
    UnsupportedFeature(
        "QK-clip / max attention logit",
        "--qk-clip / --log-max-attention-logit",
        "the per-step maximum attention logit is computed by Transformer Engine's attention, "
        "which prefix-KV attention replaces",
        **_same(Setting("qk_clip"), Setting("log_max_attention_logit")),
    ),
    UnsupportedFeature(
        "Kitchen attention",
        "--use-kitchen-attention",
        "prefix-KV attention replaces the core attention Kitchen would provide",
        **_same(Setting("use_kitchen_attention")),
    ),
    UnsupportedFeature(
        "hybrid (Mamba) models",
        "--hybrid-override-pattern",
        "Mamba layers carry a recurrent state across the sequence that slices do not hand on",
        **_same(Setting("is_hybrid_model")),
    ),
    UnsupportedFeature(
        "position embedding type",
        "--position-embedding-type",
        "relative (T5) and mrope positions are not sliced; valid with the token pipeline: "
        "learned_absolute, rope, none",
        on_args=(Setting("position_embedding_type", _position_type),),
        on_config=(),
    ),
    UnsupportedFeature(
        "legacy models",
        "--use-legacy-models",
        "the token pipeline needs megatron-core models",
        on_args=(Setting("use_legacy_models"),),
        on_config=(),
    ),
    UnsupportedFeature(
        "packed variable-length sequences (SFT)",
        "--sft",
        "THD-packed sequences have per-sample lengths that slices do not follow",
        on_args=(Setting("sft"),),
        on_config=(),
    ),
    UnsupportedFeature(
        "variable sequence lengths",
        "variable_seq_lengths",
        "the schedule is planned for one sequence length",
        on_args=(),
        on_config=(Setting("variable_seq_lengths"),),
    ),
    UnsupportedFeature(
        "generalized tensor parallelism (weight rematerialization)",
        "--tensor-parallel-num-weight-shards",
        "its weights are all-gathered and their gradients reduced once per layer call, and the "
        "token pipeline makes one call per slice; that has not been checked against stock, so "
        "it is refused rather than trusted; use --tensor-parallel-num-weight-shards equal to "
        "--tensor-model-parallel-size",
        **_same(Setting("gtp_weight_remat_size", _above_one, since="0.19.0")),
    ),
    UnsupportedFeature(
        "partial activation checkpointing by micro-batch",
        "num_microbatches_with_partial_activation_checkpoints",
        "megatron-core chooses the micro-batches to checkpoint from how many its own schedule "
        "keeps in flight; the token schedules keep other (micro-batch, slice) units in flight, "
        "so the setting would not checkpoint what it does under stock; use --recompute-* for "
        "every micro-batch",
        on_args=(),
        on_config=(Setting("num_microbatches_with_partial_activation_checkpoints", _not_none),),
    ),
    UnsupportedFeature(
        "deferred embedding weight-gradient computation",
        "--defer-embedding-wgrad-compute",
        "it defers the output layer's weight gradient across micro-batches of whole sequences",
        **_same(Setting("defer_embedding_wgrad_compute")),
    ),
    UnsupportedFeature(
        "TP communication overlap (userbuffers)",
        "--tp-comm-overlap",
        "its userbuffers are allocated once for a fixed [sequence x micro-batch, hidden] shape; "
        + "token slices have other shapes",
        **_same(Setting("tp_comm_overlap")),
    ),
    UnsupportedFeature(
        "CUDA graphs",
        "--cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph",
        "a graph replays the shapes it was captured with; " + _FIXED_SHAPES,
        **_same(
            Setting("cuda_graph_impl", _cuda_graph_impl),
            Setting("enable_cuda_graph"),
            Setting("external_cuda_graph"),
        ),
    ),
    UnsupportedFeature(
        "FP8",
        "--fp8-format",
        "delayed-scaling amax histories and scales advance per layer call, i.e. per slice "
        "instead of per sequence, so the step is not the stock step",
        **_same(Setting("fp8", _not_none)),
    ),
    UnsupportedFeature(
        "FP4",
        "--fp4-format",
        "block-scaling recipes quantise per layer call, i.e. per slice instead of per sequence",
        **_same(Setting("fp4", _not_none)),
    ),
    UnsupportedFeature(
        "activation CPU offloading",
        "--cpu-offloading-num-layers",
        "offload and reload are paired with one forward and one backward per layer and "
        "micro-batch; token slices interleave several per layer and keep the key/value prefix "
        "outside the offloaded activations",
        on_args=(Setting("cpu_offloading"), Setting("cpu_offloading_num_layers", _positive)),
        on_config=(Setting("cpu_offloading"),),
    ),
    UnsupportedFeature(
        "fine-grained activation offloading",
        "--fine-grained-activation-offloading",
        "module inputs are offloaded per layer call assuming one forward per micro-batch; "
        "token slices run several",
        **_same(Setting("fine_grained_activation_offloading")),
    ),
)


# Why a split backward (--token-pipeline-split-backward) cannot hand a layer's weight gradients
# to a later W action. The argument check words each limit by flag (`arguments.py`), the model
# check by config attribute or module (`model.weight_grad_deferral.split_backward_problems`);
# both give these reasons, so the two messages for one limit read alike.
SPLIT_BACKWARD_LIMITS: dict[str, str] = {
    "gradient_accumulation_fusion": (
        "without gradient-accumulation fusion the weight gradient is part of the autograd "
        "backward, not a GEMM megatron-core hands on that could be deferred"
    ),
    "sequence_parallel": (
        "megatron-core's weight-gradient GEMM reads a shared all-gather buffer that the next "
        "layer overwrites"
    ),
    "megatron_fsdp": (
        "megatron-core computes an FSDP parameter's weight gradient with its own matmul inside "
        "the backward"
    ),
    "transformer_engine": (
        "Transformer Engine's linear layers compute their weight gradients inside TE"
    ),
}


def _enabled(obj: Any, settings: tuple[Setting, ...]) -> list[str]:
    """`attr=value` of each setting that is on in `obj`."""
    found = []
    for setting in settings:
        value = getattr(obj, setting.attr, None)
        if setting.is_on(value) and (setting.only_if is None or setting.only_if(obj)):
            found.append(f"{setting.attr}={value!r}")
    return found


def _flag_value(feature: UnsupportedFeature, args: Any) -> str:
    """`--flag=value` as the user typed it, when one flag and one attribute say it."""
    if " / " in feature.flag or len(feature.on_args) != 1:
        return feature.flag
    value = getattr(args, feature.on_args[0].attr, None)
    return f"{feature.flag}={value}" if value is not True else feature.flag


def args_errors(args: Any) -> list[str]:
    """One message per unsupported feature on in a Megatron-LM namespace, naming its flag."""
    errors = []
    for feature in UNSUPPORTED_FEATURES:
        if _enabled(args, feature.on_args):
            errors.append(
                f"--token-pipeline does not support {feature.name} ({_flag_value(feature, args)}):"
                f" {feature.reason}"
            )
    return errors


# Rows that prefix-KV attention itself cannot compute: a layer built with the token spec also
# runs under stock schedules, where nothing else would stop it from silently attending to the
# whole sequence, so PrefixKVAttention refuses these when it is built.
ATTENTION_FEATURES = (
    "context parallelism",
    "sliding-window attention",
    "non-vanilla softmax (attention sinks)",
)


def config_problems(config: Any, only: Collection[str] | None = None) -> list[str]:
    """One description per unsupported feature on in a TransformerConfig, naming its flag;
    `only`: just the features of these names."""
    problems = []
    for feature in UNSUPPORTED_FEATURES:
        if only is not None and feature.name not in only:
            continue
        found = _enabled(config, feature.on_config)
        if found:
            problems.append(
                f"{feature.name} ({', '.join(found)}; flag {feature.flag}): {feature.reason}"
            )
    return problems


__all__ = [
    "ATTENTION_FEATURES",
    "UNSUPPORTED_FEATURES",
    "UnsupportedFeature",
    "Setting",
    "SPLIT_BACKWARD_LIMITS",
    "args_errors",
    "config_problems",
]
