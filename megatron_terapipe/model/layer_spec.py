"""Swap the core attention of a megatron-core GPT layer spec for prefix-KV attention."""

from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_terapipe.model.prefix_attention import PrefixKVAttention


def token_pipeline_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of `spec` whose self-attention uses PrefixKVAttention as core attention.

    Works for the local spec and the Transformer Engine spec (their core attention sits at the
    same place); every other module (linear layers, TP/SP, norms, MLP) is left as it was.
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
    return new_spec
