"""Rotary position embeddings at a slice's true positions.

GPTModel asks its RotaryEmbedding for `len(slice)` positions starting at 0; during a token
pipeline step the slice starts at `offset`, so a forward pre-hook passes that offset through
RotaryEmbedding's own `offset` argument. Learned absolute positions need nothing: they come
from the batch's position_ids, which the executor slices like every other tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_terapipe.model.slice_context import get_slice_context

_HOOKED_ATTR = "_terapipe_rope_offset_hook"
# set on each model passed in once its modules have been searched: later steps skip the walk
_MODEL_DONE_ATTR = "_terapipe_rope_offset_hooks_installed"


def _rope_offset_pre_hook(module, args, kwargs):
    context = get_slice_context()
    if context is None or context.current is None or context.current.offset == 0:
        return None
    if len(args) > 1 or "offset" in kwargs:
        return None  # the caller chose an offset itself
    kwargs = dict(kwargs)
    kwargs["offset"] = context.current.offset
    return args, kwargs


def install_rope_offset_hooks(models: Iterable[torch.nn.Module]) -> int:
    """Hook every RotaryEmbedding in `models` once; returns how many were hooked now.

    The executor calls this every step; a model already searched costs one attribute lookup.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    hooked = 0
    for model in models:
        if getattr(model, _MODEL_DONE_ATTR, False):
            continue
        object.__setattr__(model, _MODEL_DONE_ATTR, True)
        for module in model.modules():
            if isinstance(module, RotaryEmbedding) and not getattr(module, _HOOKED_ATTR, False):
                module.register_forward_pre_hook(_rope_offset_pre_hook, with_kwargs=True)
                setattr(module, _HOOKED_ATTR, True)
                hooked += 1
    return hooked
