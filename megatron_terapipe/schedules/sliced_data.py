"""What the user's unchanged `forward_step_func` reads: one token slice of the current batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from megatron_terapipe.model.batch_slicing import slice_batch


class SlicedDataIterator:
    """`next()` yields the current slice of the batch (`model.batch_slicing`'s rule).

    The underlying iterator is advanced once per micro-batch, on the first `next()` of that
    micro-batch, so the user's data order is exactly as under stock schedules.
    """

    def __init__(self, underlying: Iterator | None, seq_length: int) -> None:
        self.underlying = underlying
        self.seq_length = seq_length
        self.batches: dict[int, Any] = {}
        self.current: tuple[int, int, int] | None = None  # (microbatch, offset, length)

    def __iter__(self) -> SlicedDataIterator:
        return self

    def __next__(self) -> Any:
        microbatch, offset, length = self.current
        if microbatch not in self.batches:
            self.batches[microbatch] = next(self.underlying)
        return slice_batch(self.batches[microbatch], self.seq_length, offset, length)

    def done_with(self, microbatch: int) -> None:
        self.batches.pop(microbatch, None)
