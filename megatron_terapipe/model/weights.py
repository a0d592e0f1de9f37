"""Where each local parameter sits in the global (unsharded, unpipelined) model, and copying
weights between models of different layouts by that place.

megatron-core's own `sharded_state_dict()` says where each local tensor sits in the global one
(key, global offset, layer index); reusing it keeps this mapping right for TP, PP, VP, GQA and
tied embeddings without a line of layout knowledge here. The benchmark uses it to give every
variant (stock, interleaved, token) the same weights; the tests compare gradients with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamPlace:
    name: str  # local parameter name, for messages
    key: str  # global key (megatron checkpoint key)
    index: tuple  # index into the global tensor of `key`
    global_shape: tuple[int, ...]


def param_places(chunks: Iterable) -> list[tuple[torch.nn.Parameter, ParamPlace]]:
    """(parameter, place) for every parameter of the given model chunks."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    found = []
    for chunk_index, chunk in enumerate(chunks):
        module = chunk.module if hasattr(chunk, "module") else chunk
        params = {id(p): name for name, p in module.named_parameters()}
        for local_name, sharded in module.sharded_state_dict().items():
            if not isinstance(sharded, ShardedTensor) or id(sharded.data) not in params:
                continue
            index: list = []
            for axis, offset in enumerate(sharded.global_offset):
                if axis < sharded.prepend_axis_num:
                    index.append(offset)
                else:
                    size = sharded.local_shape[axis - sharded.prepend_axis_num]
                    index.append(slice(offset, offset + size))
            param = sharded.data
            found.append(
                (
                    param,
                    ParamPlace(
                        name=f"chunk{chunk_index}.{local_name}",
                        key=sharded.key,
                        index=tuple(index),
                        global_shape=tuple(sharded.global_shape),
                    ),
                )
            )
    return found


def load_global_state(chunks: Iterable, state: dict[str, torch.Tensor]) -> None:
    """Copy each local shard of `state` into the parameters of this rank."""
    with torch.no_grad():
        for param, place in param_places(chunks):
            param.copy_(state[place.key][place.index].to(param.dtype))


def local_weights(chunks: Iterable) -> list[tuple[ParamPlace, torch.Tensor]]:
    return [(place, param.detach().float().clone()) for param, place in param_places(chunks)]
