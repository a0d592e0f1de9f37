"""Global weights and gradients of a rank's chunks, and comparison with a reference.

The place of each local parameter in the global model comes from `model.weights`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_terapipe.model.weights import (  # noqa: F401 - re-exported for the tests
    ParamPlace,
    load_global_state,
    local_weights,
    param_places,
)


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


def local_grads(chunks: Iterable) -> list[tuple[ParamPlace, torch.Tensor]]:
    """This rank's gradients with their global places, for comparison with a reference."""
    return [(place, _grad_of(param)) for param, place in param_places(chunks)]


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
