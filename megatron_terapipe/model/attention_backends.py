"""Attention over one key block that returns its log-sum-exp, and the matching backward.

Prefix attention splits a slice's keys into two blocks (the earlier slices' keys, attended
without a mask, and the slice's own keys, attended causally) and merges the two partial
outputs by their log-sum-exp. The backward of a fused attention kernel recomputes the softmax
from the output and the log-sum-exp it is given; handed the *merged* output and log-sum-exp,
it returns exactly one block's share of dQ and that block's dK/dV (the split-KV backward of
flash attention). So every fused kernel that exposes its log-sum-exp serves as a block backend:

- "flash": `aten._scaled_dot_product_flash_attention_for_cpu` (CPU, any float dtype) or
  `aten._scaled_dot_product_flash_attention` (CUDA, fp16/bf16);
- "efficient": `aten._scaled_dot_product_efficient_attention` (CUDA, fp32 too);

(private ops, called through `compat.sdpa_ops`, which pins their schemas: a backend whose ops
changed in the installed torch is not offered);
- "math": explicit torch operations (any device and dtype; the only one taking a boolean mask
  or dropout, whose mask it keeps for the backward).

Shapes: queries [b, np, l, h]; keys/values [b, ng, s, h] with np = ng * rep (grouped-query
attention: query head i reads key group i // rep, as megatron-core's repeat_interleave).
Outputs [b, np, l, h] in the query dtype, log-sum-exp [b, np, l] in fp32. Block backwards
return dQ [b, np, l, h] and dK/dV [b, ng, s, h].
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_terapipe.compat import sdpa_ops

BACKEND_NAMES = ("flash", "efficient", "math")

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "terapipe_prefix_attention_backend", default=None
)


def available_prefix_attention_backends(
    device: torch.device | str, dtype: torch.dtype
) -> list[str]:
    """Backends that can run prefix attention for tensors on `device` of `dtype`, fastest first."""
    device = torch.device(device)
    names = []
    if device.type == "cpu" and dtype in (torch.float32, torch.float64, torch.bfloat16,
                                          torch.float16) and sdpa_ops.backend_ops_match(
                                              "flash", "cpu"):
        names.append("flash")
    elif device.type == "cuda":
        # Flash needs Ampere (sm80) or newer; the efficient kernel has no bf16 build before it
        # (V100s, the paper's GPUs, run fp16 / fp32 on it, bf16 on math).
        major, _ = torch.cuda.get_device_capability(device)
        half = dtype in (torch.float16, torch.bfloat16)
        if (half and major >= 8 and torch.backends.cuda.is_flash_attention_available()
                and sdpa_ops.backend_ops_match("flash", "cuda")):
            names.append("flash")
        if (dtype in (torch.float16, torch.float32) or (dtype == torch.bfloat16 and major >= 8)
                ) and sdpa_ops.backend_ops_match("efficient", "cuda"):
            names.append("efficient")
    names.append("math")
    return names


@contextlib.contextmanager
def prefix_attention_backend(name: str) -> Iterator[None]:
    """Force prefix attention to use backend `name` (one of BACKEND_NAMES) inside the block.

    A masked or dropout slice always runs on "math" (the fused kernels take neither here).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"prefix attention backend {name!r} is unknown; valid: {', '.join(BACKEND_NAMES)}"
        )
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select_backend(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool,
                   dropout: bool) -> str:
    """The forced backend if any (checked against what this device/dtype offers), else the
    fastest available. Dropout always runs on "math"; an explicit mask on "math" except with
    the CPU flash kernel (which takes an additive mask)."""
    available = available_prefix_attention_backends(device, dtype)
    forced = _FORCED.get()
    if forced is not None and forced not in available:
        raise ValueError(
            f"prefix attention backend {forced!r} is not available for {device.type} {dtype}; "
            f"available: {', '.join(available)}"
        )
    if dropout:
        return "math"
    if forced is None and device.type == "cuda" and (head_dim % 8 or head_dim > 256):
        return "math"  # outside the CUDA kernels' head sizes
    chosen = forced or available[0]
    if masked and not (chosen == "flash" and device.type == "cpu"):
        return "math"
    return chosen


@dataclass
class BlockState:
    """What one block's backward needs besides the merged output and log-sum-exp."""

    causal: bool
    lse_rows: int = 0  # rows of the kernel's own (possibly padded) log-sum-exp layout
    extra: dict = field(default_factory=dict)


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself otherwise (log-sum-exp, merge arithmetic)."""
    return torch.promote_types(dtype, torch.float32)


# -- fused kernels -----------------------------------------------------------------------------
def _grouped_queries(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, np, l, h] -> [b, ng, rep*l, h]: every query row of a group reads the same keys."""
    b, heads, rows, h = x.shape
    return x.reshape(b, groups, (heads // groups) * rows, h)


def _fused_forward(backend: str, q, k, v, causal: bool, scale: float, bias=None):
    """Kernel call on [b, n, l, h] tensors with equal head counts: (out, lse, lse_rows, extra).

    `bias` (CPU flash only) is an additive mask in the query dtype, 0 or -inf."""
    if backend == "flash" and q.device.type == "cpu":
        out, lse = sdpa_ops.flash_cpu_forward(q, k, v, causal, scale, attn_mask=bias)
        return out, lse, lse.shape[-1], {}
    if backend == "flash":
        out, lse, extra = sdpa_ops.flash_cuda_forward(q, k, v, causal, scale)
        return out, lse, lse.shape[-1], extra
    if backend == "efficient":
        out, lse, extra = sdpa_ops.efficient_forward(q, k, v, causal, scale)
        return out, lse, lse.shape[-1], extra
    raise ValueError(f"prefix attention backend {backend!r} is not implemented here")


def _fused_backward(backend: str, dout, q, k, v, out, lse, causal: bool, scale: float, extra,
                    bias=None):
    if backend == "flash" and q.device.type == "cpu":
        return sdpa_ops.flash_cpu_backward(dout, q, k, v, out, lse, causal, scale, attn_mask=bias)
    if backend == "flash":
        return sdpa_ops.flash_cuda_backward(dout, q, k, v, out, lse, causal, scale, extra)
    # The efficient backward takes only the batch and head strides of `out` from the tensor and
    # assumes rows [b, l, n, h]-contiguous (as its forward returns them); the merged output and
    # the grouped-query views are not, so every operand is laid out that way first.
    dout, q, k, v, out = (_rows_contiguous(t) for t in (dout, q, k, v, out))
    return sdpa_ops.efficient_backward(dout, q, k, v, out, lse, causal, scale, extra)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[b, n, l, h] with the memory layout of a contiguous [b, l, n, h]."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _padded(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """The merged log-sum-exp in a kernel's layout (some pad the row dimension)."""
    lse = lse.contiguous()
    return lse if rows == lse.shape[-1] else F.pad(lse, (0, rows - lse.shape[-1]))


def _masked_fused_forward(backend: str, q, k, v, causal: bool, scale: float, keep):
    """A masked block on the CPU flash kernel: keys repeated per query head (the masked path
    is not the fast path), the mask as an additive bias, and rows the mask empties given
    lse = -inf (the kernel returns 0 there, which the merge would misread)."""
    rep = q.shape[1] // k.shape[1]
    if causal:
        keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool,
                                 device=q.device).tril()
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~keep, float("-inf")
    )
    k, v = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    out, lse, lse_rows, extra = _fused_forward(backend, q, k, v, False, scale, bias)
    lse = lse[..., : q.shape[2]].to(_accumulate(q.dtype))
    lse = lse.masked_fill(~keep.any(-1), float("-inf"))
    return out, lse, BlockState(False, lse_rows, dict(extra, bias=bias))


def fused_block_forward(backend: str, q, k, v, causal: bool, scale: float, keep=None):
    """One block through a fused kernel: (out [b,np,l,h], lse [b,np,l] fp32, BlockState)."""
    if keep is not None:
        return _masked_fused_forward(backend, q, k, v, causal, scale, keep)
    b, heads, rows, h = q.shape
    groups = k.shape[1]
    if groups == heads:
        out, lse, lse_rows, extra = _fused_forward(backend, q, k, v, causal, scale)
        return out, lse[..., :rows].to(_accumulate(q.dtype)), BlockState(causal, lse_rows, extra)
    if not causal:
        # Unmasked: fold the query heads of a group into its rows, no key copies.
        out, lse, lse_rows, extra = _fused_forward(
            backend, _grouped_queries(q, groups), k, v, False, scale
        )
        lse = lse[..., : rows * heads // groups].reshape(b, heads, rows)
        lse = lse.to(_accumulate(q.dtype))
        return out.reshape(b, heads, rows, h), lse, BlockState(False, lse_rows, extra)
    # Causal block: the slice's own keys, slice-sized, so repeating them is cheap.
    rep = heads // groups
    out, lse, lse_rows, extra = _fused_forward(
        backend, q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), True,
        scale,
    )
    return out, lse[..., :rows].to(_accumulate(q.dtype)), BlockState(True, lse_rows, extra)


def fused_block_backward(backend: str, state: BlockState, dout, q, k, v, out, lse, scale):
    b, heads, rows, h = q.shape
    groups = k.shape[1]
    rep = heads // groups
    bias = state.extra.get("bias")
    if bias is not None:
        # Rows with no key at all have P = 0 whatever finite lse they are given.
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        kr, vr = (k, v) if rep == 1 else (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        dq, dk, dv = _fused_backward(
            backend, dout, q, kr, vr, out, _padded(lse, state.lse_rows), False, scale,
            state.extra, bias,
        )
        if rep == 1:
            return dq, dk, dv
        fold = (b, groups, rep, k.shape[2], k.shape[3])
        return dq, dk.reshape(fold).sum(2), dv.reshape(fold).sum(2)
    if groups == heads:
        return _fused_backward(
            backend, dout, q, k, v, out, _padded(lse, state.lse_rows), state.causal, scale,
            state.extra,
        )
    if not state.causal:
        dq, dk, dv = _fused_backward(
            backend,
            _grouped_queries(dout, groups),
            _grouped_queries(q, groups),
            k,
            v,
            _grouped_queries(out, groups),
            _padded(lse.reshape(b, groups, rep * rows), state.lse_rows),
            False,
            scale,
            state.extra,
        )
        return dq.reshape(b, heads, rows, h), dk, dv
    dq, dk, dv = _fused_backward(
        backend, dout, q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
        out, _padded(lse, state.lse_rows), True, scale, state.extra,
    )
    fold = (b, groups, rep, k.shape[2], k.shape[3])
    return dq, dk.reshape(fold).sum(2), dv.reshape(fold).sum(2)


# -- explicit math -----------------------------------------------------------------------------
def _math_scores(q, k, scale: float, causal: bool, keep: torch.Tensor | None):
    """Scores [b, ng, rep, l, s] in fp32 with masked pairs at -inf."""
    b, heads, rows, h = q.shape
    groups = k.shape[1]
    acc = _accumulate(q.dtype)
    q5 = q.to(acc).reshape(b, groups, heads // groups, rows, h)
    scores = torch.matmul(q5, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        allowed = torch.ones(rows, k.shape[2], dtype=torch.bool, device=q.device).tril()
        keep = allowed if keep is None else keep & allowed
    if keep is not None:
        scores = scores.masked_fill(~_grouped_mask(keep, groups), float("-inf"))
    return scores


def _grouped_mask(keep: torch.Tensor, groups: int) -> torch.Tensor:
    """A [.., l, s] or [b, 1|np, l, s] mask broadcastable against [b, ng, rep, l, s]."""
    if keep.dim() < 4:
        return keep
    b, heads, rows, cols = keep.shape
    if heads == 1:
        return keep.unsqueeze(2)
    return keep.reshape(b, groups, heads // groups, rows, cols)


def _probabilities(scores, lse):
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - finite.unsqueeze(-1))


def math_block_forward(q, k, v, causal: bool, scale: float, keep=None, dropout_p: float = 0.0):
    """(out, lse, BlockState); `keep` is a boolean mask (True = attend) over [l, s]."""
    b, heads, rows, h = q.shape
    scores = _math_scores(q, k, scale, causal, keep)
    lse = torch.logsumexp(scores, dim=-1)
    probs = _probabilities(scores, lse)
    extra = {}
    if dropout_p > 0.0:
        kept = torch.empty_like(probs).bernoulli_(1.0 - dropout_p).bool()
        probs = probs * kept / (1.0 - dropout_p)
        extra = dict(kept=kept, dropout_p=dropout_p)
    out = torch.matmul(probs, v.to(probs.dtype).unsqueeze(2))
    state = BlockState(causal, lse.shape[-1], extra)
    state.extra["keep"] = keep
    return (
        out.reshape(b, heads, rows, -1).to(q.dtype),
        lse.reshape(b, heads, rows),
        state,
    )


def math_block_backward(state: BlockState, dout, q, k, v, out, lse, scale):
    b, heads, rows, h = q.shape
    groups = k.shape[1]
    rep = heads // groups
    scores = _math_scores(q, k, scale, state.causal, state.extra.get("keep"))
    probs = _probabilities(scores, lse.reshape(b, groups, rep, rows))
    acc = _accumulate(q.dtype)
    dout5 = dout.to(acc).reshape(b, groups, rep, rows, -1)
    v5 = v.to(acc).unsqueeze(2)
    dprobs = torch.matmul(dout5, v5.transpose(-1, -2))
    kept = state.extra.get("kept")
    if kept is not None:
        keep_scale = kept / (1.0 - state.extra["dropout_p"])
        dv = torch.matmul((probs * keep_scale).transpose(-1, -2), dout5).sum(2)
        dprobs = dprobs * keep_scale
    else:
        dv = torch.matmul(probs.transpose(-1, -2), dout5).sum(2)
    delta = (dout5 * out.to(acc).reshape(b, groups, rep, rows, -1)).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.matmul(dscores, k.to(acc).unsqueeze(2)).reshape(b, heads, rows, h)
    dk = torch.matmul(dscores.transpose(-1, -2), q.to(acc).reshape(b, groups, rep, rows, h))
    # A prefix block's dK/dV go to the fp32 accumulator: no rounding to the model dtype first.
    kv_dtype = k.dtype if state.causal else acc
    return dq.to(q.dtype), dk.sum(2).to(kv_dtype), dv.to(kv_dtype)


# -- dispatch ------------------------------------------------------------------------------------
def block_forward(backend: str, q, k, v, causal: bool, scale: float, keep=None,
                  dropout_p: float = 0.0):
    if backend == "math":
        return math_block_forward(q, k, v, causal, scale, keep, dropout_p)
    return fused_block_forward(backend, q, k, v, causal, scale, keep)


def block_backward(backend: str, state: BlockState, dout, q, k, v, out, lse, scale):
    if backend == "math":
        return math_block_backward(state, dout, q, k, v, out, lse, scale)
    return fused_block_backward(backend, state, dout, q, k, v, out, lse, scale)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
          masked: bool = False):
    """Outputs of attention over disjoint key blocks -> attention over their union.

    Each part's output is normalised over its own block; weighting it by exp(lse_i - lse) with
    lse = logsumexp_i lse_i renormalises it over all keys (fp32 arithmetic, one rounding).
    Unmasked, every query sees at least its own key, so every lse is finite; `masked` guards
    rows a mask empties (lse = -inf) against inf - inf.
    """
    if len(parts) == 1:
        out, lse = parts[0]
        return out.to(dtype), lse
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    for _, part_lse in parts[2:]:
        lse = torch.logaddexp(lse, part_lse)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) if masked else lse
    # [b, l, n, h] in memory like the fused kernels' outputs, so that the caller's
    # [l, b, n*h] view of it needs no copy for b = 1.
    b, heads, rows, h = parts[0][0].shape
    out = lse.new_empty(b, rows, heads, h).transpose(1, 2)
    for i, (part_out, part_lse) in enumerate(parts):
        weight = torch.exp(part_lse - finite).unsqueeze(-1)
        if i == 0:
            torch.mul(part_out, weight, out=out)
        else:
            out.addcmul_(part_out, weight)
    return out.to(dtype), lse
