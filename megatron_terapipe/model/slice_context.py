"""The per-step slice context: which unit runs now, and the keys/values earlier slices left behind.

This is the project's one piece of process-wide mutable state. The executor installs a fresh
context at the start of every step and removes it at the end (`activate`), so nothing leaks
between steps. Attention modules read the *current* slice from it and keep each slice's keys
and values in its KV store, keyed by (attention module, micro-batch, slice) so that several
micro-batches can be in flight at once (1F1B orders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_terapipe.token_slices import slice_offsets


@dataclass(frozen=True)
class CurrentSlice:
    chunk: int
    microbatch: int
    token_slice: int
    offset: int  # tokens before this slice: its context length
    length: int


@dataclass
class KVEntry:
    """One slice's keys and values as later slices see them.

    When training, `key`/`value` are detached leaves that require grad: later slices attend to
    them, and autograd accumulates those slices' contributions in `.grad`, which this slice's
    own backward then adds to its keys' gradient (see prefix_attention._AddPrefixGrad).
    """

    key: torch.Tensor
    value: torch.Tensor


class TokenSliceContext:
    """State of one training (or evaluation) step of the token pipeline."""

    def __init__(self, token_slices: Sequence[int], requires_grad: bool = True) -> None:
        self.token_slices = tuple(token_slices)
        self.offsets = slice_offsets(self.token_slices)
        self.requires_grad = requires_grad
        self.current: CurrentSlice | None = None
        self._kv: dict[tuple[int, int, int, int], KVEntry] = {}

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

    def kv_entry(self, layer: object, unit: CurrentSlice) -> KVEntry | None:
        return self._kv.get((unit.chunk, id(layer), unit.microbatch, unit.token_slice))

    def store_kv(self, layer: object, unit: CurrentSlice, entry: KVEntry) -> None:
        self._kv[(unit.chunk, id(layer), unit.microbatch, unit.token_slice)] = entry

    def prefix(self, layer: object, unit: CurrentSlice) -> list[KVEntry]:
        """KV entries of slices 0..token_slice-1 of this micro-batch, in order."""
        entries = []
        for earlier in range(unit.token_slice):
            entry = self._kv.get((unit.chunk, id(layer), unit.microbatch, earlier))
            if entry is None:
                raise RuntimeError(
                    f"token pipeline: slice {unit.token_slice} of micro-batch {unit.microbatch} "
                    f"runs before slice {earlier} stored its keys/values (schedule order is wrong)"
                )
            entries.append(entry)
        return entries

    def release(self, chunk: int, microbatch: int, token_slice: int) -> None:
        """Drop a slice's KV once its backward has run on `chunk`: nothing can read it any more."""
        doomed = [
            k for k in self._kv if k[0] == chunk and k[2] == microbatch and k[3] == token_slice
        ]
        for key in doomed:
            del self._kv[key]

    def num_stored(self) -> int:
        return len(self._kv)


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
