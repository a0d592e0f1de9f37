"""Build the models a benchmark compares, all holding the same global weights.

Stock variants run megatron-core's local GPT layer spec (DotProductAttention); token variants
run the same spec with prefix-KV attention. Interleaved stock runs its own chunked copy. Weights
are copied by global parameter key (megatron's sharded-state keys), so every variant starts from
identical parameters whatever its layer layout, and losses can be compared exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_terapipe.testing.gpt import TinyGPT, build_gpt_chunks, transformer_config
from megatron_terapipe.testing.reference import load_global_state, local_weights


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


def build_model(
    model: TinyGPT, pipeline_parallel: int, token: bool, chunks: int | None = None
) -> BuiltModel:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    if token:
        from megatron_terapipe import token_pipeline_layer_spec

        spec = token_pipeline_layer_spec(spec)
    with virtual_pipeline(chunks):
        config = transformer_config(
            model, pipeline_parallel=pipeline_parallel, virtual_pipeline=chunks
        )
        raw = build_gpt_chunks(model, config, spec)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(raw)
    ]
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync if len(wrapped) > 1 else no_sync[0]
    config.finalize_model_grads_func = finalize_model_grads
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
