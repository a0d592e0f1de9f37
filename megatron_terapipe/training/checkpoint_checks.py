"""What can go wrong when resuming, found before megatron-core reads a shard.

A damaged checkpoint (a truncated ``.distcp``, a deleted ``.metadata``, unreadable common
state), a model whose flags changed since the save, a learning-rate schedule that
differs from the checkpoint's, or a new parallel layout that only the saved RNG state cannot
follow all end, inside dist-checkpointing, in a long traceback that names none of the files or
flags. Each check here turns one of them into one sentence naming the checkpoint, the iteration,
the file or flag, and what to do.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from megatron_terapipe.training import checkpoint_files

# Flags that shape parameters: a difference explains a shape mismatch.
_MODEL_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "padded_vocab_size",
    "max_position_embeddings",
    "position_embedding_type",
    "normalization",
    "swiglu",
    "add_bias_linear",
    "untie_embeddings_and_output_weights",
)

# The optimizer-parameter scheduler's state: (key, the flags it comes from).
_SCHEDULE_FIELDS = (
    ("max_lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_steps", "--lr-warmup-iters x --global-batch-size (samples)"),
    ("lr_decay_steps", "--lr-decay-iters x --global-batch-size (samples)"),
    ("lr_decay_style", "--lr-decay-style"),
    ("start_wd", "--weight-decay"),
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from as asked; the message says what to do."""


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _where(path: str, iteration: int) -> str:
    return f"checkpoint {path} (iteration {iteration})"


def file_problem(root: str, iteration: int) -> str | None:
    """A missing or truncated file of the checkpoint, found from its own ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    path = checkpoint_files.checkpoint_dir(root, iteration)
    hint = checkpoint_files.last_complete_hint(root, but=iteration)
    where = _where(path, iteration)
    metadata_file = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata_file):
        return f"{where} is damaged: {metadata_file} is missing; {hint}"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is the same problem
        return f"{where} is damaged: cannot read {metadata_file} ({type(exc).__name__}); {hint}"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            return f"{where} is damaged: {shard} is missing; {hint}"
        have = os.path.getsize(shard)
        if have < size:
            return (
                f"{where} is damaged: {shard} is truncated ({have} of at least {size} bytes); "
                f"{hint}"
            )
    return None


def common_state_file(path: str) -> str:
    """The file that holds a checkpoint's common (non-sharded) state.

    megatron-core wrote it to ``common.pt`` before 0.19.0 and, since, as one object inside the
    torch_dist shards; the shard holding it is named in the checkpoint's ``.metadata``.
    """
    legacy = os.path.join(path, "common.pt")
    if os.path.isfile(legacy):
        return legacy
    try:
        from torch.distributed.checkpoint import FileSystemReader

        for index, info in FileSystemReader(path).read_metadata().storage_data.items():
            if index.fqn.startswith("common_state"):
                return os.path.join(path, info.relative_path)
    except Exception:  # noqa: BLE001 - unreadable metadata: name the folder instead
        pass
    return path


def load_common(root: str, iteration: int) -> dict[str, Any]:
    """The checkpoint's common (non-sharded) state, or CheckpointError naming its file."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    path = checkpoint_files.checkpoint_dir(root, iteration)
    try:
        return dist_checkpointing.load_common_state_dict(path)
    # Truncated or foreign files fail in many ways; torch.distributed.checkpoint's reader (which
    # reads the common state since megatron-core 0.19.0) raises a BaseException.
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        hint = checkpoint_files.last_complete_hint(root, but=iteration)
        raise CheckpointError(
            f"{_where(path, iteration)} is damaged: cannot read its common state in "
            f"{common_state_file(path)} ({_cause(exc)}); {hint}"
        ) from None


def _cause(exc: BaseException) -> str:
    """`Type: message` of what failed, unwrapping torch.distributed.checkpoint's per-rank
    report (its text is a traceback per rank)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    return f"{type(exc).__name__}: {exc}"


def scheduler_problem(
    args: Namespace, saved: dict[str, Any], path: str, iteration: int
) -> str | None:
    """Megatron-LM's rule: a schedule that differs from the checkpoint's needs a decision."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return None
    ours = scheduler_settings(args)
    differences = []
    for key, flag in _SCHEDULE_FIELDS:
        if key in saved and saved[key] != ours[key]:
            differences.append(f"{flag}: {ours[key]!r} now, {saved[key]!r} in the checkpoint")
    if not differences:
        return None
    return (
        f"the learning-rate schedule differs from {_where(path, iteration)}: "
        + "; ".join(differences)
        + ". Give --override-opt_param-scheduler to use the new flags, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule"
    )


def scheduler_settings(args: Namespace) -> dict[str, Any]:
    """The scheduler state `optim.build_scheduler` makes from `args` (samples, not iterations)."""
    gbs = args.global_batch_size
    return {
        "max_lr": args.lr,
        "min_lr": args.min_lr,
        "lr_warmup_steps": args.lr_warmup_iters * gbs,
        "lr_decay_steps": args.lr_decay_iters * gbs,
        "lr_decay_style": args.lr_decay_style,
        "start_wd": args.weight_decay,
    }


def layout_problem(
    args: Namespace, saved_args: dict[str, Any], path: str, iteration: int, with_rng: bool
) -> str | None:
    """The RNG state is saved per (pipeline, tensor) rank: a new layout cannot load it."""
    if not with_rng:
        return None
    changed = [
        f"{flag_name(name)} {getattr(args, name)} (checkpoint: {saved_args[name]})"
        for name in ("pipeline_model_parallel_size", "tensor_model_parallel_size")
        if name in saved_args and saved_args[name] != getattr(args, name)
    ]
    if not changed:
        return None
    return (
        f"{_where(path, iteration)} was saved with another parallel layout ({', '.join(changed)}); "
        "the weights and optimizer state reshard, but the saved random-number state is per "
        "(pipeline, tensor) rank: add --no-load-rng to resume with fresh RNG streams"
    )


def changed_model_flags(args: Namespace, saved_args: dict[str, Any]) -> list[str]:
    return [
        f"{flag_name(name)} {getattr(args, name)} (checkpoint: {saved_args[name]})"
        for name in _MODEL_FLAGS
        if name in saved_args and saved_args[name] != getattr(args, name, None)
    ]


def shape_problem(
    model_state: dict,
    metadata: Any,
    args: Namespace,
    saved_args: dict[str, Any],
    path: str,
    iteration: int,
) -> str | None:
    """The first parameter whose global shape differs from the checkpoint's, with the flags."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved_shapes = {
        key: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if hasattr(meta, "size")
    }
    for value in nested_values(model_state):
        if not isinstance(value, ShardedTensor) or value.key not in saved_shapes:
            continue
        ours, theirs = tuple(value.global_shape), saved_shapes[value.key]
        if ours != theirs:
            flags = changed_model_flags(args, saved_args)
            because = (
                f"; flags that differ from the checkpoint's: {', '.join(flags)}" if flags else ""
            )
            return (
                f"{_where(path, iteration)} does not fit this model: parameter {value.key} has "
                f"shape {list(theirs)} in the checkpoint and {list(ours)} here{because}"
            )
    return None


def read_metadata(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()
