"""The MoE router under token slicing: per-token routing as stock, micro-batch terms when complete.

Top-k routing is per token, so routing a slice's rows is routing those rows of the whole
sequence. What is not per token is what megatron-core's `TopKRouter` computes over the tokens
of one router call, which stock makes once per micro-batch and the token pipeline once per
slice: the load-balancing losses (`aux_loss`, `seq_aux_loss`, `global_aux_loss`: token counts
per expert times mean router scores) and the z-loss (a mean over the call's tokens). Both are
logged per layer through megatron-core's aux-loss tracker and backpropagated through
`MoEAuxLossAutoScaler`.

`TokenSliceTopKRouter` keeps routing per slice and moves those terms to the micro-batch:

1. In each slice's forward it routes with the micro-batch terms switched off, and keeps a
   detached copy of the slice's router logits (a leaf that requires grad) in the slice
   context's per-(chunk, micro-batch) state.
2. When the micro-batch's last slice has run its forward on this layer, the leaves are
   concatenated in sequence order (the row order of stock's `[s, b, E] -> [s*b, E]` view) and
   megatron-core's own `apply_z_loss`, `compute_routing_scores_for_aux_loss` and
   `_apply_aux_loss` / `_apply_seq_aux_loss` / `_apply_global_aux_loss` run on them: the
   same values, counts, collectives, tracker records and loss scaling stock produces for the
   micro-batch, on whichever megatron-core release is installed.
3. The token schedules run every backward of a micro-batch after its last slice's forward
   (backwards go in reverse slice order), so when the first of them reaches this router the
   micro-batch's terms exist: it backpropagates them once into the leaves, and each slice's
   backward adds its own rows of that gradient to the gradient of its router logits.

Outside a token step (stock schedules, evaluation under no_grad) the class is `TopKRouter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.transformer.moe import router as mcore_router
from megatron.core.transformer.moe.router import TopKRouter

from megatron_terapipe.model.slice_context import CurrentSlice, get_slice_context


class _MicrobatchTerms:
    """One router's view of one micro-batch: each slice's logits leaf, then the terms' roots."""

    def __init__(self, num_slices: int) -> None:
        self.leaves: list[torch.Tensor | None] = [None] * num_slices
        self.padding: list[torch.Tensor | None] = [None] * num_slices
        self.roots: list[torch.Tensor] | None = None
        self.backpropagated = False

    @property
    def complete(self) -> bool:
        return all(leaf is not None for leaf in self.leaves)

    def add(self, token_slice: int, leaf: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if self.leaves[token_slice] is not None:
            raise RuntimeError(
                f"token pipeline: the MoE router ran slice {token_slice} of a micro-batch twice in "
                "one step (a recomputed forward?); its micro-batch terms would count it twice"
            )
        self.leaves[token_slice] = leaf
        self.padding[token_slice] = padding_mask

    def finish(self, router: TokenSliceTopKRouter) -> None:
        """Run stock's micro-batch terms on the whole micro-batch's logits (once complete)."""
        logits = torch.cat(self.leaves, dim=0)  # [s, b, E] in sequence order
        masks = self.padding
        padding = None
        if any(mask is not None for mask in masks):
            if not all(mask is not None for mask in masks):
                raise RuntimeError("token pipeline: a padding mask on some slices only")
            padding = torch.cat(masks, dim=0)
        with router.stock_terms():
            self.roots = router.microbatch_terms(logits, padding)

    def grad_of(self, token_slice: int) -> torch.Tensor | None:
        """The micro-batch terms' gradient for one slice's logits (backpropagated on first use)."""
        if self.roots is None:
            raise RuntimeError(
                f"token pipeline: slice {token_slice}'s backward reached the MoE router before "
                "the micro-batch's last slice ran its forward; the load-balancing and z-loss "
                "gradients need the whole micro-batch (schedule order is wrong)"
            )
        if not self.backpropagated:
            self.backpropagated = True
            roots = [root for root in self.roots if root.requires_grad]
            leaves = [leaf for leaf in self.leaves if leaf is not None]
            if roots:
                torch.autograd.backward(
                    roots, grad_tensors=[torch.zeros_like(r) for r in roots], inputs=leaves
                )
        return self.leaves[token_slice].grad


class _AddMicrobatchGrad(torch.autograd.Function):
    """Identity on a slice's router logits; its backward adds the micro-batch terms' gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, terms: _MicrobatchTerms, token_slice: int):
        ctx.terms = terms
        ctx.token_slice = token_slice
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        extra = ctx.terms.grad_of(ctx.token_slice)
        if extra is not None:
            grad = grad + extra.to(grad.dtype)
        return grad, None, None


class TokenSliceTopKRouter(TopKRouter):
    """megatron-core's TopKRouter whose micro-batch terms span all slices of a micro-batch."""

    _deferring = False

    def has_microbatch_terms(self) -> bool:
        """Whether this router computes anything over the whole call's tokens (in training)."""
        return self.config.moe_z_loss_coeff is not None or TopKRouter.is_aux_loss_enabled(self)

    @contextlib.contextmanager
    def stock_terms(self) -> Iterator[None]:
        """Within: the micro-batch terms are computed as stock computes them."""
        outer = self._deferring
        self._deferring = False
        try:
            yield
        finally:
            self._deferring = outer

    def is_aux_loss_enabled(self) -> bool:
        """Off while a slice is routed: the micro-batch's loss is formed once it is complete."""
        return False if self._deferring else super().is_aux_loss_enabled()

    def apply_z_loss(self, logits, padding_mask=None):
        """Off while a slice is routed (see `is_aux_loss_enabled`)."""
        if self._deferring:
            return logits
        return super().apply_z_loss(logits, padding_mask=padding_mask)

    def _current_slice(self) -> CurrentSlice | None:
        context = get_slice_context()
        return None if context is None else context.current

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Route one slice; record its logits for the micro-batch terms (see the module doc)."""
        unit = self._current_slice()
        if (
            unit is None
            or not (self.training and torch.is_grad_enabled())
            or not self.has_microbatch_terms()
        ):
            return super().routing(logits, padding_mask=padding_mask)
        context = get_slice_context()
        terms = context.microbatch_state(
            self, unit, lambda: _MicrobatchTerms(len(context.token_slices))
        )
        leaf = logits.detach().requires_grad_(True)
        terms.add(unit.token_slice, leaf, padding_mask)
        logits = _AddMicrobatchGrad.apply(logits, terms, unit.token_slice)
        outer = self._deferring
        self._deferring = True
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            self._deferring = outer
        if terms.complete:
            terms.finish(self)
        return probs, routing_map

    def microbatch_terms(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The z-loss and load-balancing terms of a whole micro-batch, as `TopKRouter.routing`.

        `logits` is [s, b, E]. The calls and their order are those of stock's `routing`; what
        they return (the z-loss-wrapped logits and an anchor carrying the aux losses) are the
        roots whose backward yields the micro-batch terms' gradient.
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        roots = [logits]
        if self.is_aux_loss_enabled():
            routing_map, scores = mcore_router.compute_routing_scores_for_aux_loss(
                logits,
                self.topk,
                self.score_function,
                fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
            with_padding = padding_mask is not None
            # Stock attaches the aux losses to the routed probabilities, whose gradient path
            # is the slices' own; an anchor carries them here (its value is never used).
            anchor = torch.zeros(1, dtype=scores.dtype, device=scores.device, requires_grad=True)
            anchor = self._apply_aux_loss(
                anchor, scores, routing_map, with_padding_mask=with_padding
            )
            anchor = self._apply_seq_aux_loss(
                anchor, scores, routing_map, seq_length, bsz, with_padding_mask=with_padding
            )
            anchor = self._apply_global_aux_loss(
                anchor, scores, routing_map, with_padding_mask=with_padding
            )
            roots.append(anchor)
        return roots


__all__ = ["TokenSliceTopKRouter"]
