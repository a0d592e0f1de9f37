"""Prefix-KV causal attention: the core attention of a token-sliced transformer layer.

Slice t of a sequence attends causally to its own tokens and to the keys/values of slices
0..t-1 of the same sequence. This module replaces megatron-core's core attention
(DotProductAttention or TEDotProductAttention) in the layer spec; the QKV projection, RoPE,
output projection, TP/SP communication and everything else stay megatron-core's.

Exact gradients across slices without recomputing earlier slices: slice s stores its keys and
values as detached leaves; later slices attend to those leaves, so autograd accumulates every
later slice's dK/dV in the leaves' `.grad`. When slice s's own backward runs (always after all
later slices' backwards of the micro-batch: the schedules guarantee it), `_AddPrefixGrad` adds
the accumulated gradient to the gradient of s's keys and values, which then flows back through
s's QKV projection like any other gradient. Each slice's backward is an ordinary
`torch.autograd.backward` call, so Megatron's backward_step runs per slice unchanged.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_terapipe.model.slice_context import KVEntry, get_slice_context


class _AddPrefixGrad(torch.autograd.Function):
    """Identity forward; backward adds the gradient later slices left in `leaf.grad`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        later = ctx.leaf.grad
        ctx.leaf = None
        if later is not None:
            grad = grad + later
        return grad, None


def _as_leaf(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    leaf = tensor.detach()
    if requires_grad:
        leaf.requires_grad_(True)
    return leaf


class PrefixKVAttention(MegatronModule):
    """Causal attention of one token slice over its own and all earlier slices' keys/values.

    Outside a token-pipeline step (no slice context), it is plain causal attention over the
    whole sequence, so a model built with this spec also runs under stock schedules.
    Constructor arguments are those of megatron-core's DotProductAttention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        **unused_kwargs,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "token pipeline: context parallelism (context_parallel_size="
                f"{config.context_parallel_size}) is not supported with token slicing"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"token pipeline: softmax_type={config.softmax_type!r} is not supported; "
                "only 'vanilla'"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                "token pipeline: sliding-window attention (window_size) is not supported"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"token pipeline: attention mask type {attn_mask_type} is not causal; token "
                "slicing is exact only for causal (decoder) attention"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = divide(projection_size, config.num_attention_heads)
        # Megatron's query-key layer scaling divides by layer_number and multiplies back inside
        # the softmax: mathematically a no-op, so the plain scale is used.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
        **unused_kwargs,
    ) -> torch.Tensor:
        """[sq, b, np, hn] query, [sk, b, ng, hn] key/value -> [sq, b, np*hn] context."""
        if packed_seq_params is not None:
            raise ValueError("token pipeline: packed sequences (THD) are not supported")
        if attention_bias is not None:
            raise ValueError("token pipeline: attention_bias is not supported")
        context = get_slice_context()
        unit = context.current if context is not None else None
        offset = 0
        if unit is not None:
            key, value = self._with_prefix(context, unit, key, value)
            offset = unit.offset
        return self._attend(query, key, value, attention_mask, offset)

    def _with_prefix(self, context, unit, key, value):
        """Keys/values of this slice appended to those of the earlier slices."""
        entry = context.kv_entry(self, unit)
        if entry is None:
            entry = KVEntry(
                key=_as_leaf(key, context.requires_grad),
                value=_as_leaf(value, context.requires_grad),
            )
            context.store_kv(self, unit, entry)
        # else: a recomputation (activation checkpointing) of a slice whose leaves exist already;
        # reusing them keeps the gradient later slices accumulated there.
        if context.requires_grad and torch.is_grad_enabled():
            key = _AddPrefixGrad.apply(key, entry.key)
            value = _AddPrefixGrad.apply(value, entry.value)
        prefix = context.prefix(self, unit)
        if not prefix:
            return key, value
        keys = [e.key for e in prefix] + [key]
        values = [e.value for e in prefix] + [value]
        return torch.cat(keys, dim=0), torch.cat(values, dim=0)

    def _attend(self, query, key, value, attention_mask, offset: int) -> torch.Tensor:
        sq, batch = query.shape[0], query.shape[1]
        sk = key.shape[0]
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        # [s, b, n, h] -> [b, n, s, h]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.dropout_p if self.training else 0.0
        if attention_mask is None and sq == sk:
            mask, is_causal = None, True
        else:
            # Lower-right aligned: query i sits at position offset + i of the sequence.
            positions_q = torch.arange(offset, offset + sq, device=query.device).unsqueeze(1)
            positions_k = torch.arange(sk, device=query.device).unsqueeze(0)
            mask = positions_k <= positions_q
            if attention_mask is not None:
                # Megatron's convention: True marks a masked-out (query, key) pair.
                mask = mask & ~attention_mask.bool()
            is_causal = False
        with self._dropout_rng():
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
            )
        # [b, n, sq, h] -> [sq, b, n*h]
        return out.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    def _dropout_rng(self):
        """Attention dropout draws from the TP-rank RNG stream, as megatron-core's does."""
        if self.dropout_p > 0.0 and self.training and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
