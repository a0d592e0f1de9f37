"""Token-sliced GPT: prefix-KV attention, its layer spec, and the per-step slice context."""

from megatron_terapipe.model.attention_backends import (
    available_prefix_attention_backends,
    prefix_attention_backend,
)
from megatron_terapipe.model.layer_spec import token_pipeline_layer_spec
from megatron_terapipe.model.positions import install_rope_offset_hooks
from megatron_terapipe.model.prefix_attention import PrefixKVAttention
from megatron_terapipe.model.slice_context import (
    CurrentSlice,
    TokenSliceContext,
    activate,
    get_slice_context,
)

__all__ = [
    "token_pipeline_layer_spec",
    "install_rope_offset_hooks",
    "PrefixKVAttention",
    "TokenSliceContext",
    "CurrentSlice",
    "activate",
    "get_slice_context",
    "available_prefix_attention_backends",
    "prefix_attention_backend",
]
