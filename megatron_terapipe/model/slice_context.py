"""The per-step slice context: which unit runs now, and the keys/values earlier slices left behind.

This is the project's one piece of process-wide mutable state. The executor installs a fresh
context at the start of every step and removes it at the end (`activate`), so nothing leaks
between steps. Attention modules read the *current* slice from it and keep, per (model chunk,
attention module, micro-batch), one key/value buffer of the whole sequence (`PrefixKV`) that
each slice writes its rows into, so that several micro-batches can be in flight at once (1F1B
orders). A micro-batch's buffers are dropped as a whole once every slice of it is released on
that chunk; every bookkeeping call is O(1) in the number of slices and micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_terapipe.token_slices import slice_offsets


@dataclass(frozen=True)
class CurrentSlice:
    chunk: int
    microbatch: int
    token_slice: int
    offset: int  # tokens before this slice: its context length
    length: int


class PrefixKV:
    """Keys and values of one micro-batch's whole sequence for one attention module.

    `key`/`value` are [b, ng, seq, h]; slice t writes rows offset_t .. offset_t + l_t in its
    forward and every later slice reads rows 0 .. its offset as views. `key_grad`/`value_grad`
    (fp32 at least) collect the gradient later slices' backwards send to earlier rows; the
    owning slice's backward adds its rows to its own K/V gradient, one rounding to the model
    dtype instead of one per later slice. They are made by the first backward that sends
    gradient to earlier rows (never with one slice), not during the forwards, when memory peaks,
    and left unfilled: rows 0 .. `grad_rows` hold gradient, later rows nothing yet.
    """

    def __init__(self, like: torch.Tensor, value_like: torch.Tensor, seq_length: int) -> None:
        b, groups, _, h = like.shape
        self.key = like.new_empty(b, groups, seq_length, h)
        self.value = value_like.new_empty(b, groups, seq_length, value_like.shape[-1])
        self.key_grad: torch.Tensor | None = None
        self.value_grad: torch.Tensor | None = None
        self.grad_rows = 0

    def accumulate_grad(self, rows: int, key_grad: torch.Tensor, value_grad: torch.Tensor) -> None:
        """Add a later slice's dK/dV of rows 0 .. rows (written, not added, where still empty)."""
        if self.key_grad is None:
            accumulate = torch.promote_types(self.key.dtype, torch.float32)
            self.key_grad = torch.empty(self.key.shape, dtype=accumulate, device=self.key.device)
            self.value_grad = torch.empty(
                self.value.shape, dtype=accumulate, device=self.value.device
            )
        done = min(rows, self.grad_rows)
        if done:
            self.key_grad[:, :, :done].add_(key_grad[:, :, :done])
            self.value_grad[:, :, :done].add_(value_grad[:, :, :done])
        if rows > done:
            self.key_grad[:, :, done:rows].copy_(key_grad[:, :, done:])
            self.value_grad[:, :, done:rows].copy_(value_grad[:, :, done:])
            self.grad_rows = rows

    def grad_of_rows(self, start: int, stop: int):
        """(dK, dV) later slices sent to rows start .. stop, or None if none did."""
        if stop > self.grad_rows:
            return None
        return self.key_grad[:, :, start:stop], self.value_grad[:, :, start:stop]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.key, self.value, self.key_grad, self.value_grad) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class TokenSliceContext:
    """State of one training (or evaluation) step of the token pipeline."""

    def __init__(self, token_slices: Sequence[int], requires_grad: bool = True) -> None:
        self.token_slices = tuple(token_slices)
        self.offsets = slice_offsets(self.token_slices)
        self.seq_length = sum(self.token_slices)
        self.requires_grad = requires_grad
        self.current: CurrentSlice | None = None
        # (chunk, micro-batch) -> {id(attention module): PrefixKV}
        self._buffers: dict[tuple[int, int], dict[int, PrefixKV]] = {}
        # (chunk, micro-batch) -> slices released so far
        self._released: dict[tuple[int, int], int] = {}
        # (chunk, micro-batch) -> {id(module): state} of modules whose terms span the whole
        # micro-batch (the MoE router's load-balancing and z-losses); dropped with the buffers
        self._microbatch_state: dict[tuple[int, int], dict[int, Any]] = {}
        # owner -> state that owner keeps for the whole step (`step_state`)
        self._step_state: dict[object, Any] = {}

    @contextlib.contextmanager
    def running(self, chunk: int, microbatch: int, token_slice: int) -> Iterator[CurrentSlice]:
        """Mark (chunk, microbatch, token_slice) as the unit whose forward or backward runs now."""
        outer = self.current
        self.current = CurrentSlice(
            chunk,
            microbatch,
            token_slice,
            self.offsets[token_slice],
            self.token_slices[token_slice],
        )
        try:
            yield self.current
        finally:
            self.current = outer

    def prefix_kv(self, layer: object, unit: CurrentSlice, key: torch.Tensor,
                  value: torch.Tensor) -> PrefixKV:
        """The buffer of `layer` for the unit's (chunk, micro-batch); made by its first slice.

        `key`/`value` ([b, ng, l, h]) give the buffer's shape, dtype and device.
        """
        group = self._buffers.setdefault((unit.chunk, unit.microbatch), {})
        buffer = group.get(id(layer))
        if buffer is None:
            if unit.token_slice != 0:
                raise RuntimeError(
                    f"token pipeline: slice {unit.token_slice} of micro-batch {unit.microbatch} "
                    "runs before slice 0 stored its keys/values (schedule order is wrong)"
                )
            buffer = PrefixKV(key, value, self.seq_length)
            group[id(layer)] = buffer
        return buffer

    def microbatch_state(self, module: object, unit: CurrentSlice, make: Callable[[], Any]) -> Any:
        """The state `module` keeps for the unit's (chunk, micro-batch); `make()` on first use.

        For terms stock megatron-core computes over a whole micro-batch's tokens: each slice adds
        its rows, and the state lives until every slice of the micro-batch is released.
        """
        group = self._microbatch_state.setdefault((unit.chunk, unit.microbatch), {})
        state = group.get(id(module))
        if state is None:
            state = group[id(module)] = make()
        return state

    def step_state(self, owner: object, make: Callable[[], Any]) -> Any:
        """The state `owner` keeps for this step; `make()` on first use.

        For code that megatron-core calls without a handle of ours (a wrapped kernel): the
        context is the one place it can reach, and state kept here ends with the step.
        """
        state = self._step_state.get(owner)
        if state is None:
            state = self._step_state[owner] = make()
        return state

    def buffers(self, chunk: int, microbatch: int) -> list[PrefixKV]:
        """The buffers (one per attention module) of a micro-batch on a chunk, while held."""
        return list(self._buffers.get((chunk, microbatch), {}).values())

    def release(self, chunk: int, microbatch: int, token_slice: int) -> None:
        """Mark a slice done on `chunk` (its backward ran, or forward-only); once every slice of
        the micro-batch is, nothing can read its buffers any more and they are dropped."""
        key = (chunk, microbatch)
        done = self._released.get(key, 0) + 1
        if done < len(self.token_slices):
            self._released[key] = done
            return
        self._released.pop(key, None)
        self._buffers.pop(key, None)
        self._microbatch_state.pop(key, None)

    def held_bytes(self) -> int:
        """Bytes held now by the context's K/V buffers and their gradient accumulators."""
        return sum(b.nbytes() for group in self._buffers.values() for b in group.values())

    def num_stored(self) -> int:
        """Attention buffers still held (0 after a step that ran every backward)."""
        return sum(len(group) for group in self._buffers.values())


_ACTIVE: TokenSliceContext | None = None


def get_slice_context() -> TokenSliceContext | None:
    """The context of the step in progress, or None outside the token pipeline."""
    return _ACTIVE


@contextlib.contextmanager
def activate(context: TokenSliceContext) -> Iterator[TokenSliceContext]:
    """Install `context` for the duration of one step; always removed afterwards."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a token-pipeline step is already in progress in this process")
    _ACTIVE = context
    try:
        yield context
    finally:
        _ACTIVE = None
