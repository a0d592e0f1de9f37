"""Test support for MoE under the token pipeline: small MoE GPTs and a per-slice mutation.

`per_slice_router_cases` runs cases with the token pipeline's router swap undone, so the stock
TopKRouter forms its load-balancing and z-losses over each slice's tokens: what a plugin that
only sliced the sequence would do. `padding_dropped_cases` forms them without the padding
mask. The exactness tests run both to show that they notice.
"""

from __future__ import annotations

from typing import Any

from megatron_terapipe.testing.gpt import TinyGPT
from megatron_terapipe.testing.runner import RunCase, run_cases


def moe_gpt(num_layers: int = 2, **moe: Any) -> TinyGPT:
    """A TinyGPT whose MLPs are megatron-core MoE layers (4 experts, top-2, dropless).

    No aux loss unless asked: megatron-core's default load-balancing type is `aux_loss` with a
    zero coefficient. Linear biases are off: megatron-core's expert MLP adds its bias in place
    to the output of a custom autograd function, which autograd refuses in these runs.
    """
    overrides = dict(
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        add_bias_linear=False,
    )
    overrides.update(moe)
    return TinyGPT(num_layers=num_layers, config_overrides=overrides)


def aux_losses(kind: str = "aux_loss", coeff: float = 0.1, z: float | None = 1e-2) -> dict:
    """MoE settings with one load-balancing loss (and by default the z-loss) on."""
    return dict(moe_router_load_balancing_type=kind, moe_aux_loss_coeff=coeff, moe_z_loss_coeff=z)


# Megatron-LM's MoE flags for a tiny MoE GPT: docs/moe.md's benchmark flags ($MOE) at tiny
# size: 4 experts top-2, the load-balancing and z-losses on (the terms the token pipeline forms
# per micro-batch), the alltoall dispatcher.
TINY_MOE_FLAGS = [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01",
    "--moe-z-loss-coeff", "0.001", "--moe-token-dispatcher-type", "alltoall",
    "--disable-bias-linear",
]  # fmt: skip


def per_slice_router_cases(
    rank: int, world_size: int, runs: list[tuple[RunCase, dict | None]]
) -> list[dict[str, Any]]:
    """`run_cases`, with the token-pipeline layer spec keeping stock's router (mutation)."""
    from megatron_terapipe.model import layer_spec

    layer_spec._swap_router = lambda mlp_spec: None
    return run_cases(rank, world_size, runs)


def padding_dropped_cases(
    rank: int, world_size: int, runs: list[tuple[RunCase, dict | None]]
) -> list[dict[str, Any]]:
    """`run_cases`, with the micro-batch terms formed without the padding mask (mutation)."""
    from megatron_terapipe.model.moe import TokenSliceTopKRouter

    formed = TokenSliceTopKRouter.microbatch_terms
    TokenSliceTopKRouter.microbatch_terms = lambda self, logits, padding: formed(
        self, logits, None
    )
    return run_cases(rank, world_size, runs)
