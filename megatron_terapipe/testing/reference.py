"""Map every local parameter to its place in the global (unsharded, unpipelined) model.

megatron-core's own `sharded_state_dict()` says where each local tensor sits in the global one
(key, global offset, layer index); reusing it keeps this mapping right for TP, PP, VP, GQA and
tied embeddings without a line of layout knowledge here.
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


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        return torch.zeros_like(param, dtype=torch.float32)
    return grad.detach().float().clone()


def global_state(chunks: Iterable, grads: bool = False) -> dict[str, torch.Tensor]:
    """Assemble global tensors (weights, or gradients) from a rank holding the whole model."""
    out: dict[str, torch.Tensor] = {}
    for param, place in param_places(chunks):
        tensor = out.setdefault(place.key, torch.zeros(place.global_shape, dtype=torch.float32))
        value = _grad_of(param) if grads else param.detach().float()
        tensor[place.index] = value
    return out


def load_global_state(chunks: Iterable, state: dict[str, torch.Tensor]) -> None:
    """Copy each local shard of `state` into the parameters of this rank."""
    with torch.no_grad():
        for param, place in param_places(chunks):
            param.copy_(state[place.key][place.index].to(param.dtype))


def local_grads(chunks: Iterable) -> list[tuple[ParamPlace, torch.Tensor]]:
    """This rank's gradients with their global places, for comparison with a reference."""
    return [(place, _grad_of(param)) for param, place in param_places(chunks)]


def local_weights(chunks: Iterable) -> list[tuple[ParamPlace, torch.Tensor]]:
    return [(place, param.detach().float().clone()) for param, place in param_places(chunks)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (absolute error when the reference is zero)."""
    diff = (actual.float() - expected.float()).norm().item()
    scale = expected.float().norm().item()
    return diff / scale if scale > 0 else diff


def compare_to_reference(
    local: list[tuple[ParamPlace, torch.Tensor]],
    reference: dict[str, torch.Tensor],
    rtol: float,
) -> list[str]:
    """Messages for every local tensor whose relative error to the reference exceeds `rtol`."""
    problems = []
    for place, value in local:
        expected = reference[place.key][place.index]
        if tuple(expected.shape) != tuple(value.shape):
            problems.append(f"{place.name}: shape {tuple(value.shape)} != {tuple(expected.shape)}")
            continue
        err = relative_error(value, expected)
        if not err <= rtol:
            problems.append(f"{place.name} ({place.key}{place.index}): relative error {err:.3e}")
    return problems
