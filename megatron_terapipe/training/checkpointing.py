"""Save and load through megatron-core dist-checkpointing, atomically.

A save writes into ``iter_XXXXXXX.tmp`` and is renamed to ``iter_XXXXXXX`` only after every rank
finished writing (a barrier); the tracker ``latest_checkpointed_iteration.txt`` is then replaced
atomically (write a temp file, `os.replace`). A save killed at any point leaves the previous
checkpoint and the tracker naming it untouched; the next save removes the stale temp dir.

The state dict follows Megatron-LM's (`model` / `model{i}`, `optimizer`, `opt_param_scheduler`,
`rng_state`, `iteration`, consumed samples), with the model and optimizer sharded state dicts
megatron-core builds. It does not depend on the schedule: the token pipeline's layer spec only
swaps the parameter-free core attention, so a checkpoint moves freely between schedules.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from argparse import Namespace
from typing import Any

import numpy as np
import torch

from megatron_terapipe.compat.megatron_core import load_optimizer_state
from megatron_terapipe.training import checkpoint_checks, checkpoint_files
from megatron_terapipe.training.checkpoint_checks import CheckpointError
from megatron_terapipe.training.initialize import agree_on_problem, on_gpu, print_rank_0

CHECKPOINT_VERSION = 3.0
_PER_RANK_ARGS = ("rank", "local_rank")
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _unwrap(chunk):
    """DDP -> (Float16Module ->) GPTModel: what Megatron-LM checkpoints (Float16Module kept)."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _metadata(args: Namespace) -> dict[str, Any]:
    from megatron.core import parallel_state

    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _serializable(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


def _rng_state():
    """Every RNG a resumed run needs, as a ShardedObject per (PP, TP) rank (Megatron-LM's)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if on_gpu() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _plain_args(args: Namespace) -> dict[str, Any]:
    simple = (str, int, float, bool, type(None))
    out = {}
    for key, value in vars(args).items():
        if key in _PER_RANK_ARGS:
            continue  # common state must be equal on every rank
        if isinstance(value, simple):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, simple) for v in value):
            out[key] = list(value)
    return out


def _state_dict(
    args: Namespace,
    model: list,
    optimizer,
    scheduler,
    metadata: dict,
    loading: bool,
    with_optimizer: bool = True,
    with_rng: bool = True,
) -> dict[str, Any]:
    state: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION}
    for index, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{index}"
        state[key] = _unwrap(chunk).sharded_state_dict(metadata=metadata)
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=metadata
        )
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank_0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(
    args: Namespace,
    iteration: int,
    model: list,
    optimizer,
    scheduler,
    num_floating_point_operations_so_far: float = 0.0,
) -> str:
    """Save iteration `iteration` under args.save; returns the final checkpoint directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    start = time.time()
    final = checkpoint_files.checkpoint_dir(args.save, iteration)
    tmp = final + TMP_SUFFIX
    print_rank_0(
        f"saving checkpoint at iteration {iteration:7d} to {args.save} in torch_dist format"
    )
    if _is_rank_0():
        os.makedirs(args.save, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by a save that was killed
        os.makedirs(tmp)
    _barrier()

    metadata = _metadata(args)
    state = _state_dict(
        args,
        model,
        optimizer,
        scheduler,
        metadata,
        loading=False,
        with_optimizer=not args.no_save_optim,
        with_rng=not args.no_save_rng,
    )
    state.update(
        iteration=iteration,
        args=_plain_args(args),
        consumed_train_samples=args.consumed_train_samples,
        consumed_valid_samples=getattr(args, "consumed_valid_samples", 0),
        num_floating_point_operations_so_far=num_floating_point_operations_so_far,
    )
    dist_checkpointing.save(
        state,
        tmp,
        get_default_save_sharded_strategy("torch_dist"),
        validate_access_integrity=True,
        content_metadata=_serializable(metadata),
    )
    _barrier()  # every rank's shards are on disk before the directory becomes visible
    if _is_rank_0():
        if os.path.exists(final):
            # Re-saving an iteration: move the old one aside first, so the name never points
            # at a half-state; the tracker still names a complete directory throughout.
            old = final + OLD_SUFFIX
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _write_tracker(args.save, iteration)
    _barrier()
    print_rank_0(
        f"  successfully saved checkpoint from iteration {iteration:7d} to {args.save} "
        f"({time.time() - start:.2f}s)"
    )
    return final


def _write_tracker(root: str, iteration: int) -> None:
    path = checkpoint_files.tracker_path(root)
    tmp = path + TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(args: Namespace, model: list, optimizer, scheduler) -> tuple[int, float]:
    """Load args.load (args.ckpt_step or the tracker's iteration) into model/optimizer/scheduler.

    Sets args.consumed_train_samples / consumed_valid_samples; returns (iteration, flops so far).
    With --finetune the iteration, optimizer and RNG are not restored (Megatron-LM's meaning).
    An empty auto-resume directory (--save D --load D) loads nothing: iteration 0. Every
    problem found before reading shards (damaged files, changed model flags, a new schedule,
    a new layout under the saved RNG state) raises CheckpointError on every rank alike.
    """
    from megatron.core import dist_checkpointing, tensor_parallel

    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    iteration = checkpoint_files.iteration_to_load(args.load, args.ckpt_step)
    if iteration is None:
        print_rank_0(
            f" no checkpoint in {args.load} yet (--load = --save): starting from scratch"
        )
        return 0, 0.0
    path = checkpoint_files.checkpoint_dir(args.load, iteration)
    print_rank_0(f" loading checkpoint from {args.load} at iteration {iteration}")
    _raise_agreed(checkpoint_checks.file_problem(args.load, iteration))
    common = checkpoint_checks.load_common(args.load, iteration)
    saved = common.get("args", {})
    with_optimizer = not (args.no_load_optim or args.finetune or saved.get("no_save_optim"))
    with_rng = not (args.no_load_rng or args.finetune or saved.get("no_save_rng"))
    metadata = _metadata(args)
    sharded = _state_dict(
        args,
        model,
        optimizer,
        scheduler,
        metadata,
        loading=True,
        with_optimizer=with_optimizer,
        with_rng=with_rng,
    )
    problem = checkpoint_checks.layout_problem(args, saved, path, iteration, with_rng)
    if problem is None and with_optimizer and "opt_param_scheduler" in common:
        problem = checkpoint_checks.scheduler_problem(
            args, common["opt_param_scheduler"], path, iteration
        )
    if problem is None:
        model_state = {k: v for k, v in sharded.items() if k.startswith("model")}
        problem = checkpoint_checks.shape_problem(
            model_state, checkpoint_checks.read_metadata(path), args, saved, path, iteration
        )
    _raise_agreed(problem)

    try:
        state = dist_checkpointing.load(sharded, path, strict="assume_ok_unexpected")
        for index, chunk in enumerate(model):
            key = "model" if len(model) == 1 else f"model{index}"
            _unwrap(chunk).load_state_dict(state[key], strict=True)
    except Exception as exc:  # noqa: BLE001 - a rank-local read failure, named with its cause
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        hint = checkpoint_files.last_complete_hint(args.load, but=iteration)
        error = CheckpointError(
            f"checkpoint {path} (iteration {iteration}) could not be read on rank {rank} "
            f"({type(exc).__name__}: {str(exc)[:500]}); {hint}"
        )
        error.rank_local = True  # type: ignore[attr-defined]
        raise error from exc
    if with_optimizer and optimizer is not None:
        flags_limits = _lr_limits(optimizer)
        load_optimizer_state(optimizer, state["optimizer"])
        if args.override_opt_param_scheduler:
            # The optimizer's param groups carry --lr / --min-lr too (megatron-core's per-group
            # max_lr / min_lr); loading brought back the checkpoint's, the flags must win.
            _set_lr_limits(optimizer, flags_limits)
        if scheduler is not None and "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if with_rng and "rng_state" in state:
        rng = state["rng_state"][0]
        random.setstate(rng["random_rng_state"])
        np.random.set_state(rng["np_rng_state"])
        torch.set_rng_state(rng["torch_rng_state"])
        if on_gpu() and rng.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(rng["cuda_rng_state"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])

    if args.finetune:
        return 0, 0.0
    args.consumed_train_samples = int(common.get("consumed_train_samples", 0))
    args.consumed_valid_samples = int(common.get("consumed_valid_samples", 0))
    print_rank_0(f"  successfully loaded checkpoint from {args.load} at iteration {iteration}")
    return iteration, float(common.get("num_floating_point_operations_so_far", 0.0))


def _lr_limits(optimizer) -> list[dict[str, float]]:
    return [
        {key: group[key] for key in ("max_lr", "min_lr") if key in group}
        for group in optimizer.param_groups
    ]


def _set_lr_limits(optimizer, limits: list[dict[str, float]]) -> None:
    for group, values in zip(optimizer.param_groups, limits, strict=True):
        group.update(values)


def _raise_agreed(problem: str | None) -> None:
    """Raise the first problem any rank found, on every rank (so none waits in a collective)."""
    problem = agree_on_problem(problem)
    if problem is not None:
        raise CheckpointError(problem)
