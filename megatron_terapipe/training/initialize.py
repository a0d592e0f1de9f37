"""Process groups, device, seeds and micro-batch bookkeeping, as Megatron-LM's initialize does."""

from __future__ import annotations

import datetime
import os
import random
from argparse import Namespace

import numpy as np
import torch


def print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def print_rank_last(message: str) -> None:
    """Megatron-LM prints iteration lines from the last rank: it holds the loss."""
    if not torch.distributed.is_initialized() or (
        torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    ):
        print(message, flush=True)


_ON_GPU = False


def on_gpu() -> bool:
    """Whether this run computes on the GPU (nccl) or on the CPU (gloo)."""
    return _ON_GPU


def device() -> torch.device:
    if _ON_GPU:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_problem(problem: str | None) -> str | None:
    """The first problem (rank order) any rank found, returned on every rank.

    Collective: every rank calls it, so a problem found on one rank stops all of them at the
    same point, and rank 0 can print it once.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return problem
    found: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(found, problem)
    return next((p for p in found if p is not None), None)


def initialize_distributed(args: Namespace) -> None:
    """Start the process group and megatron-core's model-parallel groups.

    gloo means a CPU run, even on a machine with GPUs: megatron-core's CUDA-only calls are
    remapped to the CPU first (`compat.enable_cpu`), so the same code path runs on a laptop
    and on a GPU cluster.
    """
    global _ON_GPU
    _ON_GPU = args.distributed_backend == "nccl" and torch.cuda.is_available()
    if not _ON_GPU:
        from megatron_terapipe.compat import enable_cpu

        enable_cpu(force=True)
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
            # One process started without a launcher: a port of its own, so that two such
            # runs on one machine (or one beside a torchrun on 29500) do not collide.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        torch.distributed.init_process_group(
            backend=args.distributed_backend,
            world_size=args.world_size,
            rank=int(os.environ["RANK"]),
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
    args.rank = torch.distributed.get_rank()

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )


def set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding: a different seed per pipeline rank, TP streams via the tracker."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_microbatches(args: Namespace) -> None:
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    init_num_microbatches_calculator(
        args.rank,
        None,
        args.global_batch_size,
        args.micro_batch_size,
        args.data_parallel_size,
        False,
    )


def shutdown() -> None:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
