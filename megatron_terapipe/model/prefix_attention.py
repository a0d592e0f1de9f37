"""Prefix-KV causal attention: the core attention of a token-sliced transformer layer.

Slice t of a sequence attends causally to its own tokens and to the keys/values of slices
0..t-1 of the same sequence. This module replaces megatron-core's core attention
(DotProductAttention or TEDotProductAttention) in the layer spec; the QKV projection, RoPE,
output projection, TP/SP communication and everything else stay megatron-core's.

One key/value buffer per (chunk, layer, micro-batch) covers the whole sequence
(slice_context.PrefixKV): each slice writes its rows, later slices read the rows before them as
views, so nothing is concatenated or saved twice. A slice's attention is two blocks, the prefix
rows without a mask and its own rows causally, merged by their log-sum-exp (no boolean mask).
Exact gradients across slices without recomputing earlier slices: a slice's backward adds its
prefix block's dK/dV into the buffer's fp32 accumulator, and when an earlier slice's backward
runs (always after all later slices' backwards of the micro-batch: the schedules guarantee it)
it adds its rows of the accumulator to the gradient of its own keys and values, which then flows
back through its QKV projection like any other gradient. Each slice's backward is an ordinary
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

from megatron_terapipe.model.attention_backends import (
    block_backward,
    block_forward,
    merge,
    select_backend,
)
from megatron_terapipe.model.slice_context import PrefixKV, get_slice_context
from megatron_terapipe.unsupported_features import ATTENTION_FEATURES, config_problems


class _SliceAttention(torch.autograd.Function):
    """One slice's attention over the buffer rows before it (unmasked) and its own (causal).

    Inputs are [b, n, l, h] views; `keep` is the slice's boolean mask (True = attend) over the
    [l, offset + l] key columns when the batch brings an explicit one, else None.
    """

    @staticmethod
    def forward(ctx, query, key, value, kv: PrefixKV, offset: int, scale: float, keep,
                dropout_p: float):
        rows = query.shape[2]
        kv.key[:, :, offset : offset + rows].copy_(key)
        kv.value[:, :, offset : offset + rows].copy_(value)
        backend = select_backend(
            query.device, query.dtype, query.shape[-1], keep is not None, dropout_p > 0.0
        )
        blocks = [(offset, offset + rows, True)]
        if offset:
            blocks.insert(0, (0, offset, False))
        parts, states = [], []
        for start, stop, causal in blocks:
            block_keep = None if keep is None else keep[..., start:stop]
            out, lse, state = block_forward(
                backend, query, kv.key[:, :, start:stop], kv.value[:, :, start:stop], causal,
                scale, block_keep, dropout_p,
            )
            parts.append((out, lse))
            states.append(state)
        out, lse = merge(parts, query.dtype, masked=keep is not None)
        if query.untyped_storage().nbytes() > query.numel() * query.element_size():
            # A view into the fused QKV projection output: saving it would keep the keys and
            # values there alive next to their copy in the buffer.
            query = query.clone()
        ctx.save_for_backward(query, out, lse)
        ctx.kv, ctx.offset, ctx.scale, ctx.backend = kv, offset, scale, backend
        ctx.blocks, ctx.states = blocks, states
        return out

    @staticmethod
    def backward(ctx, dout):
        query, out, lse = ctx.saved_tensors
        kv, offset = ctx.kv, ctx.offset
        rows = query.shape[2]
        dquery = dkey = dvalue = None
        for (start, stop, causal), state in zip(ctx.blocks, ctx.states):
            dq, dk, dv = block_backward(
                ctx.backend, state, dout, query, kv.key[:, :, start:stop],
                kv.value[:, :, start:stop], out, lse, ctx.scale,
            )
            dquery = dq if dquery is None else dquery.add_(dq)
            if causal:
                dkey, dvalue = dk, dv
            else:
                kv.accumulate_grad(stop, dk, dv)
        later = kv.grad_of_rows(offset, offset + rows)
        if later is not None:
            # Later slices' share of this slice's keys/values, accumulated in fp32.
            dkey = later[0].add(dkey).to(dkey.dtype)
            dvalue = later[1].add(dvalue).to(dvalue.dtype)
        ctx.kv = ctx.states = None
        return dquery, dkey, dvalue, None, None, None, None, None


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
        # The same table (and words) as the argument check and check_token_pipeline_support;
        # needed here because a model built with this spec also runs under stock schedules.
        problems = config_problems(config, only=ATTENTION_FEATURES)
        if problems:
            raise ValueError("prefix-KV attention (token pipeline) does not support: "
                             + "; ".join(problems))
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
        if unit is None:
            return self._attend(query, key, value, attention_mask, 0)
        return self._attend_slice(context, unit, query, key, value, attention_mask)

    def _attend_slice(self, context, unit, query, key, value, attention_mask) -> torch.Tensor:
        """One slice of a token step: its keys/values go into the micro-batch's buffer."""
        rows, batch = query.shape[0], query.shape[1]
        if key.shape[0] != unit.length:
            raise RuntimeError(
                f"token pipeline: attention got {key.shape[0]} keys for slice {unit.token_slice} "
                f"of length {unit.length}"
            )
        # [s, b, n, h] -> [b, n, s, h] views
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        kv = context.prefix_kv(self, unit, k, v)
        keep = None
        if attention_mask is not None:
            # Megatron's convention: True marks a masked-out (query, key) pair.
            keep = ~attention_mask.bool()[..., : unit.offset + rows]
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng():
            out = _SliceAttention.apply(
                q, k, v, kv, unit.offset, self.softmax_scale, keep, dropout_p
            )
        # [b, n, sq, h] -> [sq, b, n*h]
        return out.permute(2, 0, 1, 3).reshape(rows, batch, self.hidden_size_per_partition)

    def _attend(self, query, key, value, attention_mask, offset: int) -> torch.Tensor:
        """Plain (stock-schedule) attention over the whole sequence."""
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
