"""The private aten attention ops prefix attention calls, against the installed torch.

The schema check runs on every torch the suite runs on (CI: the 3.11 and the 3.12 pairs; the GPU
check: the GPU machine's torch), and fails, never skips, when torch changes an op.
"""

from __future__ import annotations

import pytest
import torch

from megatron_terapipe.compat import sdpa_ops
from megatron_terapipe.model import attention_backends


@pytest.mark.parametrize("name", sorted(sdpa_ops.PINNED_SCHEMAS))
def test_installed_torch_has_the_pinned_schema(name):
    installed = sdpa_ops.installed_schema(name)
    assert installed == sdpa_ops.PINNED_SCHEMAS[name], (
        f"torch {torch.__version__} changed aten.{name}: update compat/sdpa_ops.py's call and "
        f"pin.\n pinned:    {sdpa_ops.PINNED_SCHEMAS[name]}\n installed: {installed}"
    )


def test_every_op_a_backend_calls_is_pinned():
    called = {name for names in sdpa_ops.BACKEND_OPS.values() for name in names}
    assert called == set(sdpa_ops.PINNED_SCHEMAS)


class _SchemaCheckingAten:
    """A stand-in for torch.ops.aten whose ops only check a call against the pinned schema
    (torch's own schema parser): positional count, keyword names, every required argument."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        schema = torch._C.parse_schema(sdpa_ops.PINNED_SCHEMAS[name])
        returns = len(schema.returns)

        def call(*args, **kwargs):
            arguments = schema.arguments
            positional = [a for a in arguments if not a.kwarg_only]
            assert len(args) <= len(positional), f"{name}: {len(args)} positional arguments"
            names = {a.name for a in arguments}
            unknown = set(kwargs) - names
            assert not unknown, f"{name}: no argument named {sorted(unknown)}"
            given = {a.name for a in positional[: len(args)]} | set(kwargs)
            missing = [a.name for a in arguments
                       if a.name not in given and not a.has_default_value()]
            assert not missing, f"{name}: required {missing} not given"
            self.calls.append(name)
            return tuple(torch.zeros(1) for _ in range(returns))

        return call


def test_every_call_matches_its_pinned_schema(monkeypatch):
    """Covers the CUDA calls too, which this machine cannot run."""
    fake = _SchemaCheckingAten()
    monkeypatch.setattr(sdpa_ops, "aten", fake)
    t = torch.zeros(1)
    saved = dict(cum_q=t, cum_k=t, max_q=1, max_k=1, rng=t, unused=t, seed=t, offset=t)
    sdpa_ops.flash_cpu_forward(t, t, t, True, 0.5)
    sdpa_ops.flash_cpu_backward(t, t, t, t, t, t, True, 0.5, attn_mask=t)
    sdpa_ops.flash_cuda_forward(t, t, t, True, 0.5)
    sdpa_ops.flash_cuda_backward(t, t, t, t, t, t, True, 0.5, saved)
    sdpa_ops.efficient_forward(t, t, t, True, 0.5)
    sdpa_ops.efficient_backward(t, t, t, t, t, t, True, 0.5, saved)
    assert sorted(fake.calls) == sorted(sdpa_ops.PINNED_SCHEMAS)


def test_a_changed_op_withdraws_its_backend(monkeypatch):
    """A schema that no longer matches takes the fused backend off the list (math runs, with a
    warning naming the op) instead of a call that misreads its arguments."""
    name = "_scaled_dot_product_flash_attention_for_cpu"
    pins = dict(sdpa_ops.PINNED_SCHEMAS)
    pins[name] = pins[name].replace("bool is_causal=False", "bool causal=False")
    monkeypatch.setattr(sdpa_ops, "PINNED_SCHEMAS", pins)
    sdpa_ops.backend_ops_match.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=name):
            offered = attention_backends.available_prefix_attention_backends(
                "cpu", torch.float32
            )
        assert offered == ["math"]
    finally:
        monkeypatch.undo()
        sdpa_ops.backend_ops_match.cache_clear()
    assert attention_backends.available_prefix_attention_backends("cpu", torch.float32) == [
        "flash", "math"
    ]
