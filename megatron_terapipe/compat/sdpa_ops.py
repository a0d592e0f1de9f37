"""The private aten attention ops behind prefix attention's fused backends, pinned by schema.

Prefix attention needs each block's log-sum-exp and a backward that takes the *merged* output
and log-sum-exp (the split-KV backward of flash attention). torch's public attention API
returns neither, so the fused backends call the aten ops that `scaled_dot_product_attention`
dispatches to. Those ops are private and may change between torch releases; the calls below are
written against the schemas in `PINNED_SCHEMAS`, pass every argument after the tensors by name
(a renamed or reordered argument raises instead of being misread), and a backend whose ops do not
match their pinned schema in the installed torch is not offered (prefix attention falls back to
the explicit-math backend, with a warning naming the op). tests/test_sdpa_ops.py compares the
installed torch against the pins, so a schema change fails the suite rather than a run.
"""

from __future__ import annotations

import functools
import warnings

import torch

aten = torch.ops.aten

PINNED_SCHEMAS: dict[str, str] = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, "
        "Tensor value, float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp)"
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, "
        "Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, "
        "bool is_causal, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, "
        "Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_flash_attention": (
        "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, Tensor unused, "
        "Tensor debug_attn_mask)"
    ),
    "_scaled_dot_product_flash_attention_backward": (
        "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, "
        "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
        "Tensor philox_seed, Tensor philox_offset, *, float? scale=None) -> (Tensor grad_query, "
        "Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_efficient_attention": (
        "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, "
        "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, "
        "*, float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, "
        "Tensor philox_offset)"
    ),
    "_scaled_dot_product_efficient_attention_backward": (
        "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, Tensor query, "
        "Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, "
        "Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, "
        "bool is_causal=False, *, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

# Which ops each fused backend calls, per device type.
BACKEND_OPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("flash", "cpu"): (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    ("flash", "cuda"): (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    ),
    ("efficient", "cuda"): (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ),
}


def installed_schema(name: str) -> str | None:
    """The installed torch's schema of `aten.<name>.default`, or None if torch has no such op."""
    packet = getattr(aten, name, None)
    if packet is None:
        return None
    try:
        return str(packet.default._schema)
    except (AttributeError, RuntimeError):
        return None


def schema_mismatches(names: tuple[str, ...] | None = None) -> dict[str, str | None]:
    """Ops (all pinned ones by default) whose installed schema differs from the pin: name ->
    the installed schema (None when the op is gone)."""
    names = tuple(PINNED_SCHEMAS) if names is None else names
    found = {name: installed_schema(name) for name in names}
    return {name: schema for name, schema in found.items() if schema != PINNED_SCHEMAS[name]}


@functools.cache
def backend_ops_match(backend: str, device_type: str) -> bool:
    """Whether `backend`'s ops on `device_type` match their pins; warns once per backend if not."""
    names = BACKEND_OPS.get((backend, device_type))
    if names is None:
        return False
    mismatched = schema_mismatches(names)
    if mismatched:
        warnings.warn(
            f"prefix attention: torch {torch.__version__} changed the schema of "
            f"{', '.join('aten.' + n for n in mismatched)}, so the {backend!r} backend is not "
            "offered on " + device_type + " (the explicit-math backend runs instead: exact, "
            "slower); megatron_terapipe/compat/sdpa_ops.py pins the schemas its calls need",
            RuntimeWarning,
            stacklevel=2,
        )
    return not mismatched


# -- calls, written against PINNED_SCHEMAS ---------------------------------------------------
def flash_cpu_forward(q, k, v, causal: bool, scale: float, attn_mask=None):
    """(output, logsumexp)."""
    return aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=0.0, is_causal=causal, attn_mask=attn_mask, scale=scale
    )


def flash_cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float, attn_mask=None):
    """(dq, dk, dv)."""
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, dropout_p=0.0, is_causal=causal, attn_mask=attn_mask,
        scale=scale,
    )


def flash_cuda_forward(q, k, v, causal: bool, scale: float):
    """(output, logsumexp, what the backward needs back)."""
    out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = (
        aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale
        )
    )
    return out, lse, dict(cum_q=cum_q, cum_k=cum_k, max_q=max_q, max_k=max_k, rng=rng,
                          unused=unused)


def flash_cuda_backward(dout, q, k, v, out, lse, causal: bool, scale: float, saved: dict):
    """(dq, dk, dv)."""
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, saved["cum_q"], saved["cum_k"], saved["max_q"], saved["max_k"],
        dropout_p=0.0, is_causal=causal, philox_seed=saved["rng"],
        philox_offset=saved["unused"], scale=scale,
    )


def efficient_forward(q, k, v, causal: bool, scale: float):
    """(output, logsumexp, what the backward needs back)."""
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, scale=scale
    )
    return out, lse, dict(seed=seed, offset=offset)


def efficient_backward(dout, q, k, v, out, lse, causal: bool, scale: float, saved: dict):
    """(dq, dk, dv); the bias gradient is not asked for."""
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, saved["seed"], saved["offset"], dropout_p=0.0,
        grad_input_mask=[True, True, True, False], is_causal=causal, scale=scale,
    )
    return dq, dk, dv
