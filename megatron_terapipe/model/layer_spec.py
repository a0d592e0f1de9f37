"""Swap the core attention of a megatron-core GPT layer spec for prefix-KV attention, and an MoE
layer's router for one whose micro-batch terms span all slices of a micro-batch."""

from __future__ import annotations

import copy
import functools

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_terapipe.model.prefix_attention import PrefixKVAttention


def token_pipeline_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of `spec` whose self-attention uses PrefixKVAttention as core attention.

    Works for the local spec and the Transformer Engine spec (their core attention sits at the
    same place). In an MoE layer spec the router becomes `TokenSliceTopKRouter` (megatron-core's
    TopKRouter, with its load-balancing and z-losses formed over the whole micro-batch); every
    other module (linear layers, TP/SP, norms, experts, dispatcher) is left as it was.
    """
    if not isinstance(spec, ModuleSpec):
        raise TypeError(
            "token_pipeline_layer_spec expects a megatron-core ModuleSpec, got "
            f"{type(spec).__name__}"
        )
    new_spec = copy.deepcopy(spec)
    self_attention = getattr(new_spec.submodules, "self_attention", None)
    attention_submodules = getattr(self_attention, "submodules", None)
    if attention_submodules is None or not hasattr(attention_submodules, "core_attention"):
        raise ValueError(
            "token_pipeline_layer_spec: the spec has no self_attention.submodules.core_attention "
            "(expected a GPT decoder layer spec such as get_gpt_layer_local_spec())"
        )
    attention_submodules.core_attention = PrefixKVAttention
    _swap_router(getattr(new_spec.submodules, "mlp", None))
    return new_spec


def _swap_router(mlp_spec: object) -> None:
    """Give an MoE layer spec the token-slice router (stock's TopKRouter only: another router
    class computes what this module cannot know to be per token)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_terapipe.model.moe import TokenSliceTopKRouter

    submodules = getattr(mlp_spec, "submodules", None)
    if submodules is None and isinstance(mlp_spec, functools.partial):
        # megatron-core 0.19's specs bind the MoE layer's submodules with functools.partial
        submodules = mlp_spec.keywords.get("submodules")
    router = getattr(submodules, "router", None)
    if router is None or not isinstance(router, type):
        return
    if issubclass(router, TokenSliceTopKRouter):
        return
    if router is not TopKRouter:
        raise ValueError(
            f"token_pipeline_layer_spec: the MoE layer's router is {router.__qualname__}; the "
            "token pipeline runs megatron-core's TopKRouter (as TokenSliceTopKRouter) only"
        )
    submodules.router = TokenSliceTopKRouter
