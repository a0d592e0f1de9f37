"""A test mode that catches tensors handed to torch.distributed off the model's device.

On a GPU every tensor a step hands to NCCL must be a CUDA tensor; a tensor created on the host
(a hard-coded CPU device, a `.cpu()` copy, a factory call without `device=`) fails there, but not
on the CPU + gloo machines the tests run on. `distributed_tensors_on(device)` wraps the
torch.distributed entry points megatron-core and the executor use and raises `DeviceMismatch`
naming the call and the device. `default_device="meta"` makes the host distinguishable on a CPU
run: tensors created without an explicit device land on 'meta', as they would land on the CPU
while the model sits on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

CHECKED_FUNCTIONS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


class DeviceMismatch(RuntimeError):
    """A tensor handed to torch.distributed is not on the model's device."""


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dist.P2POp):
        yield value.tensor
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _checked(name: str, function, expected: torch.device):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            for tensor in _tensors(value):
                if tensor.device.type != expected.type:
                    raise DeviceMismatch(
                        f"torch.distributed.{name} got a {tuple(tensor.shape)} {tensor.dtype} "
                        f"tensor on {tensor.device}; the model is on {expected}"
                    )
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def distributed_tensors_on(
    expected: torch.device, default_device: str | None = None
) -> Iterator[None]:
    """Check every tensor handed to torch.distributed inside the block against `expected`."""
    saved = {}
    for name in CHECKED_FUNCTIONS:
        original = getattr(distributed_c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = (getattr(dist, name, None), getattr(distributed_c10d, name, None))
        wrapped = _checked(name, original, expected)
        setattr(dist, name, wrapped)
        if saved[name][1] is not None:
            # P2POp validates its op against distributed_c10d's isend/irecv: keep them one object
            setattr(distributed_c10d, name, wrapped)
    previous_default = torch.get_default_device()
    if default_device is not None:
        torch.set_default_device(default_device)
    try:
        yield
    finally:
        if default_device is not None:
            torch.set_default_device(previous_default)
        for name, (on_dist, on_c10d) in saved.items():
            setattr(dist, name, on_dist)
            if on_c10d is not None:
                setattr(distributed_c10d, name, on_c10d)
