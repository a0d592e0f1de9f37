"""Build the models a benchmark compares, all holding the same global weights.

Every model comes from `training.model` (the trainer's model provider) on the benchmark's
validated pretrain_gpt.py arguments; a variant only chooses the attention kernel (the
token-pipeline spec's SDPA, or megatron-core's local DotProductAttention) and the number of
virtual stages. Stock 1F1B on the same kernel and the token schedules share one model. Weights
are copied by global parameter key (megatron's sharded-state keys), so every variant starts
from identical parameters whatever its layer layout, and losses can be compared exactly.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_terapipe.model.weights import load_global_state, local_weights


@dataclass
class BuiltModel:
    """DDP-wrapped chunks of one rank and what a forward-backward call needs with them."""

    chunks: list  # DDP-wrapped
    config: Any
    virtual_pipeline: int | None

    @property
    def model_arg(self) -> Any:
        return self.chunks if len(self.chunks) > 1 else self.chunks[0]

    def parameters(self) -> list[torch.Tensor]:
        params = [p for c in self.chunks for p in c.parameters()]
        params += [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
        return params


@contextlib.contextmanager
def virtual_pipeline(size: int | None) -> Iterator[None]:
    """parallel_state's VP world size is process-global; set it only while a VP model runs."""
    from megatron.core import parallel_state

    previous = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(size)
    try:
        yield
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(previous)


def variant_args(model_args: argparse.Namespace, attention: str, chunks: int | None
                 ) -> argparse.Namespace:
    """The pretrain_gpt.py arguments of one variant's model: kernel and virtual stages."""
    args = argparse.Namespace(**vars(model_args))
    args.attention_backend = "flash" if attention == "sdpa" else attention
    args.virtual_pipeline_model_parallel_size = chunks
    return args


def build_model(model_args: argparse.Namespace, attention: str, chunks: int | None = None
                ) -> BuiltModel:
    from megatron_terapipe.training import model as provider

    args = variant_args(model_args, attention, chunks)
    with virtual_pipeline(chunks):
        config = provider.transformer_config_from_args(args)
        wrapped = provider.build_model(args, config, verbose=False)
    provider.attach_schedule_hooks(config, wrapped)
    found = provider.built_attention_kernels(wrapped)
    if found != {attention}:
        raise ValueError(f"asked for {attention} attention, the model provider built {found}")
    return BuiltModel(wrapped, config, chunks)


def gather_global_weights(built: BuiltModel) -> dict[str, torch.Tensor]:
    """The full model's weights on every rank (all pipeline ranks contribute their shards)."""
    pieces = [(place.key, place.index, place.global_shape, w) for place, w in
              local_weights(built.chunks)]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, pieces)
    state: dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for key, index, shape, value in rank_pieces:
            state.setdefault(key, torch.zeros(shape, dtype=torch.float32))[index] = value
    return state


def load_weights(built: BuiltModel, state: dict[str, torch.Tensor]) -> None:
    with virtual_pipeline(built.virtual_pipeline):
        load_global_state(built.chunks, state)
