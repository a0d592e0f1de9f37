"""Rank bodies for testing the harness and the CPU compat layer in spawned processes.

They live in the package, not in tests/, because spawned ranks import their target by module
path and the package is importable however pytest was started.
"""

from __future__ import annotations

import os
import time
from typing import Any


def fail_on_rank(rank: int, world_size: int, bad_rank: int) -> int:
    """`bad_rank` raises while the others wait in a barrier it never reaches."""
    import torch

    if rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    torch.distributed.barrier()
    return rank


def hang_on_rank(rank: int, world_size: int, bad_rank: int) -> int:
    """`bad_rank` never returns (no collective involved: only the caller's deadline can end it)."""
    if rank == bad_rank:
        while True:
            time.sleep(3600)
    return rank


def exit_on_rank(rank: int, world_size: int, bad_rank: int, code: int) -> int:
    """`bad_rank` dies without a Python traceback (as after a segfault or the OOM killer)."""
    if rank == bad_rank:
        os._exit(code)
    return rank


def _draws(n: int = 4) -> list[float]:
    import torch

    return torch.rand(n).tolist()


def rng_probe(rank: int, world_size: int, seed: int) -> dict[str, Any]:
    """What a test of `enable_cpu()` needs to know about megatron's RNG tracker on this rank."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_terapipe.compat import cpu

    out: dict[str, Any] = {}
    patches_before = cpu.applied_patches()
    out["enable_again"] = cpu.enable_cpu()
    out["idempotent"] = cpu.applied_patches() == patches_before and len(patches_before) > 0
    out["enabled"] = cpu.cpu_enabled()
    out["current_device"] = str(torch.cuda.current_device())

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        streams = []
        for _ in range(2):  # seeding twice must reset the tracker and give the same streams
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            tracker = get_cuda_rng_tracker()
            default_before_fork = _draws()
            with tracker.fork():  # model-parallel-rng
                model_parallel = _draws()
            default_after_fork = _draws()
            with tracker.fork("data-parallel-rng"):
                data_parallel = _draws()
            with tracker.fork():  # the stream continues where it left off
                model_parallel_next = _draws()
            streams.append(
                {
                    "default": default_before_fork + default_after_fork,
                    "model_parallel": model_parallel,
                    "model_parallel_next": model_parallel_next,
                    "data_parallel": data_parallel,
                }
            )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        out["default_without_fork"] = _draws() + _draws()
        out["streams"] = streams
        out["tracker_class"] = type(get_cuda_rng_tracker()).__name__
    finally:
        parallel_state.destroy_model_parallel()
    return out


def pretend_cuda_host() -> None:
    """Make this process look like a CUDA host to `torch.cuda.is_available()`."""
    import torch

    torch.cuda.is_available = lambda: True


def cpu_remaps_state(rank: int, world_size: int) -> dict[str, Any]:
    """What a spawned rank sees: CUDA reported available, CPU remaps on, buffers on the CPU."""
    import torch
    from megatron.core import parallel_state

    from megatron_terapipe.compat.cpu import cpu_enabled

    parallel_state.initialize_model_parallel()
    try:
        return {
            "cuda_reported": torch.cuda.is_available(),
            "cpu_enabled": cpu_enabled(),
            "current_device": str(torch.cuda.current_device()),
        }
    finally:
        parallel_state.destroy_model_parallel()
