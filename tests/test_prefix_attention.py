"""Slice-by-slice prefix attention over one K/V buffer equals causal attention over the whole
sequence: outputs and dQ/dK/dV, for every CPU backend, grouped-query heads, explicit masks,
uneven slices (a slice of length 1, a slice longer than the rest together) and dropout.

Reference: torch's scaled_dot_product_attention on the whole sequence (GQA by
repeat_interleave, megatron-core's convention), differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_terapipe.model.attention_backends import (
    available_prefix_attention_backends,
    prefix_attention_backend,
)
from megatron_terapipe.model.prefix_attention import _SliceAttention
from megatron_terapipe.model.slice_context import TokenSliceContext, activate

SCALE = 0.3


def _inputs(batch, heads, groups, seq, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, groups, seq, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, groups, seq, dim, generator=gen, dtype=dtype)
    dout = torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, keep=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if keep is None:
        out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=SCALE)
    else:
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=keep & causal, scale=SCALE)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _sliced(q, k, v, dout, slices, keep=None, dropout_p=0.0):
    outs, *rest = _sliced_run(q, k, v, dout, slices, keep, dropout_p)
    return (torch.cat(outs, dim=2), *rest)


def _sliced_run(q, k, v, dout, slices, keep=None, dropout_p=0.0):
    """Forwards of every slice in order, then backwards in reverse, as the executor runs them."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    context = TokenSliceContext(slices)
    layer = object()
    outs = []
    with activate(context):
        for t, (offset, length) in enumerate(zip(context.offsets, slices)):
            rows = slice(offset, offset + length)
            with context.running(0, 0, t) as unit:
                kt, vt = k[:, :, rows], v[:, :, rows]
                kv = context.prefix_kv(layer, unit, kt, vt)
                mask = None if keep is None else keep[..., rows, : offset + length]
                outs.append(
                    _SliceAttention.apply(
                        q[:, :, rows], kt, vt, kv, offset, SCALE, mask, dropout_p
                    )
                )
        held = [context.held_bytes()]
        for t in reversed(range(len(slices))):
            offset, length = context.offsets[t], slices[t]
            outs[t].backward(dout[:, :, offset : offset + length])
            held.append(context.held_bytes())
            context.release(0, 0, t)
        assert context.held_bytes() == 0 and context.num_stored() == 0
    return [o.detach() for o in outs], q.grad, k.grad, v.grad, held


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


SLICINGS = {
    "whole": [64],
    "uneven-with-1": [1, 7, 40, 16],
    "long-last": [2, 3, 59],  # one slice longer than all the others together
    "ones-then-long": [1, 1, 62],
    "equal-8": [8] * 8,
}


@pytest.mark.parametrize("backend", available_prefix_attention_backends("cpu", torch.float32))
@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("slicing", list(SLICINGS))
def test_sliced_equals_whole_fp32(backend, groups, slicing):
    q, k, v, dout = _inputs(2, 4, groups, 64, 16, torch.float32)
    expected = _reference(q, k, v, dout)
    with prefix_attention_backend(backend):
        *got, held = _sliced(q, k, v, dout, SLICINGS[slicing])
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert _rel(a, b) <= 1e-5, f"{name}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("backend", available_prefix_attention_backends("cpu", torch.float64))
def test_sliced_equals_whole_fp64_to_rounding(backend):
    """In fp64 the split is exact to ~1e-13: any algebra slip would show far above that."""
    q, k, v, dout = _inputs(1, 6, 2, 48, 8, torch.float64, seed=3)
    expected = _reference(q, k, v, dout)
    with prefix_attention_backend(backend):
        *got, _ = _sliced(q, k, v, dout, [1, 30, 17])
    for a, b in zip(got, expected):
        assert _rel(a, b) <= 1e-12


@pytest.mark.parametrize("backend", available_prefix_attention_backends("cpu", torch.float32))
@pytest.mark.parametrize("groups", [4, 2])
def test_explicit_mask_exact(backend, groups):
    """A document mask (queries see only their own document: rows whose whole prefix block is
    masked) with random holes, GQA, a slice of one token."""
    q, k, v, dout = _inputs(2, 4, groups, 40, 8, torch.float32, seed=1)
    document = torch.tensor([0] * 9 + [1] * 16 + [2] * 15)
    keep = (document[:, None] == document[None, :]).expand(2, 1, 40, 40).clone()
    gen = torch.Generator().manual_seed(9)
    keep &= (torch.rand(2, 1, 40, 40, generator=gen) > 0.3) | torch.eye(40, dtype=torch.bool)
    expected = _reference(q, k, v, dout, keep)
    with prefix_attention_backend(backend):
        *got, _ = _sliced(q, k, v, dout, [1, 13, 11, 15], keep=keep)
    for a, b in zip(got, expected):
        assert _rel(a, b) <= 1e-5


def test_buffers_are_flat_in_the_number_of_slices():
    """One K/V buffer per layer and micro-batch whatever S is; the fp32 dK/dV accumulators
    appear with the first backward that has earlier slices to send gradient to."""
    q, k, v, dout = _inputs(1, 4, 2, 64, 16, torch.float32)
    per_tensor = 1 * 2 * 64 * 16 * 4
    held = _sliced(q, k, v, dout, [64])[-1]
    assert held == [2 * per_tensor] * 2
    for slicing in ([8] * 8, [1] * 64):
        held = _sliced(q, k, v, dout, slicing)[-1]
        assert held[0] == 2 * per_tensor  # after the forwards: keys and values only
        assert max(held) == 4 * per_tensor


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.bool_outputs: list = []
        self.copied_rows: list = []  # (op, rows) of every cat / repeat_interleave

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        if "cat" in str(func) or "repeat_interleave" in str(func):
            self.copied_rows.append((func, out.shape[2]))
        results = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(r, torch.Tensor) and r.dtype == torch.bool for r in results):
            self.bool_outputs.append(func)
        return out


def test_fast_path_builds_no_mask_and_forcing_a_backend_is_honoured():
    q, k, v, dout = _inputs(1, 4, 2, 32, 8, torch.float32)
    flash_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    with prefix_attention_backend("flash"), _OpLog() as log:
        _sliced_run(q, k, v, dout, [4, 12, 16])
    assert flash_op in log.ops
    assert not log.bool_outputs, f"boolean tensors built on the fast path: {log.bool_outputs}"
    # GQA repeats only a slice's own keys (its causal block), never the prefix; nothing is cat.
    assert all("repeat_interleave" in str(op) and rows <= 16 for op, rows in log.copied_rows)
    with prefix_attention_backend("math"), _OpLog() as log:
        _sliced(q, k, v, dout, [4, 12, 16])
    assert flash_op not in log.ops
    with pytest.raises(ValueError, match="efficient"), prefix_attention_backend("efficient"):
        _sliced(q, k, v, dout, [4, 12, 16])
    with pytest.raises(ValueError, match="valid"), prefix_attention_backend("fastest"):
        pass


def test_dropout_is_unbiased():
    """Mean over many dropout draws of outputs and gradients -> the dropout-free values.

    The draws are the batch: one sequence repeated 4000 times gets 4000 independent masks."""
    q, k, v, dout = _inputs(1, 2, 1, 6, 4, torch.float64, seed=2)
    expected = _reference(q, k, v, dout)
    draws = 4000
    many = [t.expand(draws, *t.shape[1:]).contiguous() for t in (q, k, v, dout)]
    torch.manual_seed(0)
    got = _sliced(*many, [2, 1, 3], dropout_p=0.3)[:4]
    for a, b in zip(got, expected):
        assert _rel(a.mean(0, keepdim=True), b) <= 0.03
    assert _rel(got[0][:1], expected[0]) > 0.05  # dropout did act on one draw


def test_padded_log_sum_exp_kernels(monkeypatch):
    """Kernels that pad the log-sum-exp rows (CUDA's efficient kernel pads to 32): the merge
    reads only the real rows and each block's backward gets the merged values in the padded
    layout. Simulated on CPU around the CPU flash kernel, with garbage in the padding."""
    from megatron_terapipe.model import attention_backends as backends

    aten = torch.ops.aten

    def padded_forward(backend, q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                    scale=scale)
        rows = -(-lse.shape[-1] // 32) * 32
        padded = torch.full((*lse.shape[:-1], rows), float("nan"), dtype=lse.dtype)
        padded[..., : lse.shape[-1]] = lse
        return out, padded, rows, {"rows": q.shape[2]}

    def padded_backward(backend, dout, q, k, v, out, lse, causal, scale, extra):
        assert lse.shape[-1] == -(-extra["rows"] // 32) * 32 and lse.is_contiguous()
        assert not lse[..., : extra["rows"]].isnan().any()
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse[..., : extra["rows"]].contiguous(), 0.0, causal, scale=scale
        )

    monkeypatch.setattr(backends, "_fused_forward", padded_forward)
    monkeypatch.setattr(backends, "_fused_backward", padded_backward)
    monkeypatch.setattr(backends, "available_prefix_attention_backends",
                        lambda device, dtype: ["efficient", "math"])
    q, k, v, dout = _inputs(2, 4, 2, 80, 8, torch.float32, seed=4)
    expected = _reference(q, k, v, dout)
    with prefix_attention_backend("efficient"):
        *got, _ = _sliced(q, k, v, dout, [1, 45, 34])
    for a, b in zip(got, expected):
        assert _rel(a, b) <= 1e-5


def test_efficient_kernel_calls_with_its_layout_and_signature(monkeypatch):
    """The CUDA efficient kernel's calls, run on CPU through stand-ins with the ops' schema
    (argument order and keywords as in torch's native_functions.yaml): its backward assumes
    [b, l, n, h]-contiguous rows for every operand (it reads only the batch and head strides
    of `out`), and its log-sum-exp is padded to 32 rows. GQA folds query heads into rows, the
    layout that breaks when passed as is."""
    from megatron_terapipe.compat import sdpa_ops
    from megatron_terapipe.model import attention_backends as backends

    aten = torch.ops.aten

    def rows_contiguous(x):
        return x.transpose(1, 2).is_contiguous()

    class EfficientOnCpu:
        def __getattr__(self, name):
            return getattr(aten, name)

        @staticmethod
        def _scaled_dot_product_efficient_attention(query, key, value, attn_bias,
                                                    compute_log_sumexp, dropout_p=0.0,
                                                    is_causal=False, *, scale=None):
            assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, scale=scale)
            rows = -(-lse.shape[-1] // 32) * 32
            padded = torch.full((*lse.shape[:-1], rows), float("nan"), dtype=lse.dtype)
            padded[..., : lse.shape[-1]] = lse
            empty = torch.empty(0)
            return out.transpose(1, 2).contiguous().transpose(1, 2), padded, empty, empty

        @staticmethod
        def _scaled_dot_product_efficient_attention_backward(
                grad_out_, query, key, value, attn_bias, out, logsumexp, philox_seed,
                philox_offset, dropout_p, grad_input_mask, is_causal=False, *, scale=None):
            for name, t in dict(grad_out_=grad_out_, query=query, key=key, value=value,
                                out=out).items():
                assert rows_contiguous(t), f"{name} is not [b, l, n, h]-contiguous"
            assert list(grad_input_mask) == [True, True, True, False]
            rows = query.shape[2]
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out_, query, key, value, out, logsumexp[..., :rows].contiguous(), 0.0,
                is_causal, scale=scale)
            return dq, dk, dv, None

    monkeypatch.setattr(sdpa_ops, "aten", EfficientOnCpu())
    monkeypatch.setattr(backends, "available_prefix_attention_backends",
                        lambda device, dtype: ["efficient", "math"])
    for groups in (4, 2):
        q, k, v, dout = _inputs(2, 4, groups, 80, 8, torch.float32, seed=5)
        expected = _reference(q, k, v, dout)
        with prefix_attention_backend("efficient"):
            *got, _ = _sliced(q, k, v, dout, [1, 45, 34])
        for a, b in zip(got, expected):
            assert _rel(a, b) <= 1e-5
