"""What one call of the forward-backward function runs on, on one rank, fixed before it starts.

The executor's setup (`executor.py`) builds a `StepState` from megatron-core's keywords; the step
loop (`step_loop.py`) reads it and keeps its own mutable bookkeeping apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_terapipe.model.slice_context import TokenSliceContext
from megatron_terapipe.schedules.ir import Action, Schedule
from megatron_terapipe.schedules.sliced_data import SlicedDataIterator

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class ProcessGroups:
    """The groups and peers a step runs on: a passed `p2p_communicator` / `pg_collection`
    (megatron-core's keywords) where given, megatron-core's global groups otherwise."""

    pp: torch.distributed.ProcessGroup
    next_rank: int
    prev_rank: int
    tp_size: int
    cp_size: int

    @classmethod
    def of(cls, config: TransformerConfig, p2p_communicator: Any = None,
           pg_collection: Any = None) -> ProcessGroups:
        if p2p_communicator is not None:
            pp = p2p_communicator.pp_group
        elif pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
            pp = pg_collection.pp
        else:
            pp = parallel_state.get_pipeline_model_parallel_group()
        communicator = p2p_communicator or P2PCommunicator(pp, config)

        def size(name: str, fallback: Callable[[], int]) -> int:
            group = getattr(pg_collection, name, None) if pg_collection is not None else None
            return group.size() if group is not None else fallback()

        return cls(
            pp=pp,
            next_rank=communicator.next_rank,
            prev_rank=communicator.prev_rank,
            tp_size=size("tp", parallel_state.get_tensor_model_parallel_world_size),
            cp_size=size("cp", parallel_state.get_context_parallel_world_size),
        )


@dataclass(frozen=True)
class StepState:
    """The inputs of one step on one rank.

    `config` is the model's megatron-core TransformerConfig; `marks_first_microbatch` follows
    megatron-core's check_first_val_step (a validation step that is not the first one leaves
    the model's first-micro-batch state, FP8 weight caching, alone).
    """

    forward_step_func: Callable
    models: list[torch.nn.Module]
    iterators: list[SlicedDataIterator]
    config: TransformerConfig
    token_slices: tuple[int, ...]
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    forward_only: bool
    collect_non_loss_data: bool
    schedule: Schedule
    context: TokenSliceContext
    record: bool
    groups: ProcessGroups
    marks_first_microbatch: bool
    device: torch.device

    @cached_property
    def rank(self) -> int:
        return self.groups.pp.rank()

    @cached_property
    def num_stages(self) -> int:
        return self.groups.pp.size()

    @property
    def num_chunks(self) -> int:
        return len(self.models)

    @cached_property
    def actions(self) -> tuple[Action, ...]:
        """This rank's action list."""
        return self.schedule.stages[self.rank]

    def is_first_virtual_stage(self, chunk: int) -> bool:
        return self.rank == 0 and chunk == 0

    def is_last_virtual_stage(self, chunk: int) -> bool:
        return self.rank == self.num_stages - 1 and chunk == self.num_chunks - 1

    def activation_shape(self, token_slice: int) -> tuple[int, int, int]:
        """A received activation's (or gradient's) shape: [slice length / SP, batch, hidden]."""
        divisor = self.groups.tp_size if self.config.sequence_parallel else 1
        length = self.token_slices[token_slice] // divisor
        return (length, self.micro_batch_size, self.config.hidden_size)


def first_microbatch_marked(forward_only: bool, first_val_step: bool | None) -> bool:
    """megatron-core's check_first_val_step: whether this step marks the first micro-batch."""
    return not (forward_only and first_val_step is not None and not first_val_step)


def model_device(models: Sequence[torch.nn.Module]) -> torch.device:
    """Where the model lives: every tensor the step hands to torch.distributed goes there."""
    for model in models:
        for param in model.parameters():
            return param.device
    return torch.device("cpu")
