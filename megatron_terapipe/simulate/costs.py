"""Per-action costs for the simulator, from unit costs or from a stage cost model.

The simulator asks per action rather than per step because token slices differ: a later slice
attends to more context, so its forward and backward take longer, and TeraPipe's whole point is
choosing slices that balance that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from megatron_terapipe.schedules.ir import Schedule


class MemoryModel(Protocol):
    """What the simulator asks of a memory model (`slicing.memory.ActivationMemoryModel`)."""

    def rank_peaks(self, schedule: Schedule, token_slices: Sequence[Sequence[int]],
                   batch_sizes: Sequence[int]) -> list[float]: ...


@dataclass
class ActionCosts:
    """Times (seconds, or abstract units) of one action.

    forward/backward: (stage, chunk, slice_len, context_len) -> time of that compute; `backward`
    prices a whole backward, weight gradients included.
    transfer: (slice_len) -> time of one P2P message of that slice, 0 for none.
    memory: the model that prices each rank's peak activation bytes over a schedule's order,
    for micro-batches of `batch` sequences; None reports unit counts only.
    weight_grad: same arguments -> the weight-gradient part of that backward, which a split
    backward runs as its own W action (the B action then costs the rest); None prices it as
    `weight_grad_share` of the backward (0.5: Zero Bubble's B = W, right for GEMM-bound layers;
    attention-heavy stages have less).
    """

    forward: Callable[[int, int, int, int], float]
    backward: Callable[[int, int, int, int], float]
    transfer: Callable[[int], float]
    memory: MemoryModel | None = None
    batch: int = 1
    name: str = "custom"
    time_unit: str = "s"
    weight_grad: Callable[[int, int, int, int], float] | None = None
    weight_grad_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight_grad_share <= 1.0:
            raise ValueError(
                f"weight_grad_share must be in [0, 1], got {self.weight_grad_share}"
            )

    def weight_grad_time(self, stage: int, chunk: int, slice_len: int, context_len: int) -> float:
        """The W part of one backward (see `weight_grad`)."""
        if self.weight_grad is not None:
            return float(self.weight_grad(stage, chunk, slice_len, context_len))
        return self.weight_grad_share * float(self.backward(stage, chunk, slice_len, context_len))

    @staticmethod
    def uniform() -> ActionCosts:
        """Forward 1, backward 2, free communication, whatever the slice: the setting in which
        the textbook bubble formulas hold exactly."""
        return ActionCosts(
            forward=lambda stage, chunk, slice_len, context_len: 1.0,
            backward=lambda stage, chunk, slice_len, context_len: 2.0,
            transfer=lambda slice_len: 0.0,
            name="uniform",
            time_unit="units",
        )

    @staticmethod
    def from_stage_cost_model(
        model: Any,
        batch: int = 1,
        backward_ratio: float = 2.0,
        num_chunks: int = 1,
        memory: MemoryModel | None = None,
    ) -> ActionCosts:
        """Split a stage model's forward+backward time into forward and backward.

        `model.forward_backward_time(batch, slice_len, context_len)` prices a whole stage; with
        `num_chunks` virtual stages a chunk holds 1/V of the stage's layers, so it costs 1/V.
        `model.p2p_time(batch, slice_len)` prices one message.
        """
        if backward_ratio <= 0:
            raise ValueError(f"backward_ratio must be > 0, got {backward_ratio}")
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        forward_share = 1.0 / (1.0 + backward_ratio) / num_chunks
        backward_share = backward_ratio / (1.0 + backward_ratio) / num_chunks

        def fb(slice_len: int, context_len: int) -> float:
            return float(model.forward_backward_time(batch, slice_len, context_len))

        return ActionCosts(
            forward=lambda stage, chunk, slice_len, context_len: (
                forward_share * fb(slice_len, context_len)
            ),
            backward=lambda stage, chunk, slice_len, context_len: (
                backward_share * fb(slice_len, context_len)
            ),
            transfer=lambda slice_len: float(model.p2p_time(batch, slice_len)),
            memory=memory,
            batch=batch,
            name=str(getattr(model, "name", type(model).__name__)),
            time_unit="s",
        )
