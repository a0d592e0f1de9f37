"""Peak activation memory on any device, counted from the tensors that training keeps alive.

On CPU there is no allocator statistic that separates activations from weights, gradients and
temporaries, so the tracker counts what a pipeline schedule actually has to hold between a
forward and its backward:

- every tensor autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`): the
  pack hook registers the tensor's *storage* (a view keeps its whole base alive, so the
  storage's bytes are what is held), and the registration is dropped when autograd frees the
  saved tensor (the packed handle is garbage-collected after the backward that used it, or
  with its graph);
- tensors the schedule holds outside autograd, registered by the caller with `hold`/`drop`:
  the token pipeline's K/V buffers and their fp32 gradient accumulators
  (`observe_token_pipeline`).

Storages are deduplicated by data pointer, so a tensor saved by several ops or both saved and
held counts once. Parameters (and their views, e.g. a transposed weight saved by a linear
layer) are excluded: they are not activations. The peak is the maximum of the live total,
updated at every registration. On CUDA use `torch.cuda.max_memory_allocated` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind `tensor`; None for storage-less tensors."""
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    nbytes = storage.nbytes()
    if nbytes == 0:
        return None
    return storage.data_ptr(), nbytes


class _Packed:
    """What autograd stores instead of the tensor; its death means the tensor was freed."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int] | None, tracker) -> None:
        self.tensor = tensor
        self.key = key
        self.tracker = tracker

    def __del__(self) -> None:
        if self.key is not None:
            self.tracker._release(self.key)


class ActivationMemoryTracker:
    """Live and peak bytes of saved-for-backward and schedule-held storages (see module doc)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._refs: dict[tuple[int, int], int] = {}
        self._excluded = {k[0] for k in (_storage_key(t) for t in exclude) if k is not None}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._held: dict[int, list[tuple[int, int]]] = {}

    def sample(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes

    # -- registration --------------------------------------------------------------------------
    def _acquire(self, key: tuple[int, int]) -> None:
        count = self._refs.get(key, 0)
        self._refs[key] = count + 1
        if count == 0:
            self.live_bytes += key[1]
        self.sample()

    def _release(self, key: tuple[int, int]) -> None:
        count = self._refs.get(key, 0)
        if count <= 1:
            if count == 1:
                del self._refs[key]
                self.live_bytes -= key[1]
            return
        self._refs[key] = count - 1

    def _key(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        key = _storage_key(tensor)
        if key is None or key[0] in self._excluded:
            return None
        return key

    def hold(self, owner: object, tensors: Iterable[torch.Tensor]) -> None:
        """Count `tensors` as held by `owner` (anything hashable by identity) until `drop`."""
        keys = [k for k in (self._key(t) for t in tensors) if k is not None]
        for key in keys:
            self._acquire(key)
        self._held.setdefault(id(owner), []).extend(keys)

    def drop(self, owner: object) -> None:
        for key in self._held.pop(id(owner), []):
            self._release(key)

    # -- autograd hooks ------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> _Packed:
        key = self._key(tensor)
        if key is not None:
            self._acquire(key)
        # Detached: a saved *output* would otherwise reference its own grad_fn through the
        # handle, a cycle that keeps a dropped graph (and its bytes) alive.
        return _Packed(tensor.detach(), key, self)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    @contextlib.contextmanager
    def saved_tensors(self) -> Iterator[ActivationMemoryTracker]:
        """Count every tensor autograd saves while the context is open."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


@contextlib.contextmanager
def observe_token_pipeline(tracker: ActivationMemoryTracker) -> Iterator[None]:
    """Count what the token pipeline holds outside autograd's saved tensors.

    That is one K/V buffer per (chunk, layer, micro-batch), held from the micro-batch's first
    slice until its last slice is released, the buffer's fp32 dK/dV accumulators, held from
    the first backward that writes them, with split backwards the inputs and output
    gradients a B queues for its W, and with attention dropout each attention block's
    dropout mask (kept in the autograd context's state, not saved through autograd), from the
    block's forward to its backward. They are registered by storage like saved tensors, so a
    storage both saved by autograd and held by the context counts once. Benchmark-only: five
    methods of TokenSliceContext / PrefixKV / DeferredWeightGrads and the prefix attention's
    two block functions are wrapped for the duration.
    """
    from megatron_terapipe.model import prefix_attention
    from megatron_terapipe.model.slice_context import PrefixKV, TokenSliceContext
    from megatron_terapipe.model.weight_grad_deferral import DeferredWeightGrads

    original_prefix_kv = TokenSliceContext.prefix_kv
    original_release = TokenSliceContext.release
    original_accumulate = PrefixKV.accumulate_grad
    original_add = DeferredWeightGrads.add
    original_run = DeferredWeightGrads.run
    original_block_forward = prefix_attention.block_forward
    original_block_backward = prefix_attention.block_backward

    def block_forward(*args: Any, **kwargs: Any) -> Any:
        out, lse, state = original_block_forward(*args, **kwargs)
        kept = state.extra.get("kept") if isinstance(getattr(state, "extra", None), dict) else None
        if kept is not None:
            tracker.hold(state, (kept,))
        return out, lse, state

    def block_backward(backend: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_block_backward(backend, state, *args, **kwargs)
        tracker.drop(state)
        return result

    def prefix_kv(self, layer: Any, unit: Any, key: Any, value: Any) -> Any:
        buffer = original_prefix_kv(self, layer, unit, key, value)
        if unit.token_slice == 0:
            tracker.hold(buffer, (buffer.key, buffer.value))
        return buffer

    def accumulate_grad(self, rows: int, key_grad: Any, value_grad: Any) -> None:
        new = self.key_grad is None
        original_accumulate(self, rows, key_grad, value_grad)
        if new:
            tracker.hold(self, (self.key_grad, self.value_grad))

    def release(self, chunk: int, microbatch: int, token_slice: int) -> None:
        held = self.buffers(chunk, microbatch)
        original_release(self, chunk, microbatch, token_slice)
        if not self.buffers(chunk, microbatch):
            for buffer in held:
                tracker.drop(buffer)

    def add(self, kernel: Any, args: tuple) -> None:
        original_add(self, kernel, args)
        tracker.hold(self, args[:2])  # the GEMM's input and output gradient, until W

    def run(self) -> None:
        original_run(self)
        tracker.drop(self)

    TokenSliceContext.prefix_kv = prefix_kv
    TokenSliceContext.release = release
    PrefixKV.accumulate_grad = accumulate_grad
    DeferredWeightGrads.add = add
    DeferredWeightGrads.run = run
    prefix_attention.block_forward = block_forward
    prefix_attention.block_backward = block_backward
    try:
        yield
    finally:
        prefix_attention.block_forward = original_block_forward
        prefix_attention.block_backward = original_block_backward
        TokenSliceContext.prefix_kv = original_prefix_kv
        TokenSliceContext.release = original_release
        PrefixKV.accumulate_grad = original_accumulate
        DeferredWeightGrads.add = original_add
        DeferredWeightGrads.run = original_run
