"""Checkpoint directory layout, Megatron-LM's: ``<dir>/iter_0000010/`` and a tracker file.

Kept free of torch so argument validation can check ``--load`` before anything starts. The
tracker ``latest_checkpointed_iteration.txt`` is written only after a checkpoint directory is
complete and in place, so a reader that finds the tracker always finds a whole checkpoint.
"""

from __future__ import annotations

import os

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# dist-checkpointing writes this last in a save; its presence marks a finished checkpoint.
COMPLETE_MARKER = "metadata.json"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tracker_path(root: str) -> str:
    return os.path.join(root, TRACKER_FILENAME)


def read_tracker(root: str) -> int | None:
    """The iteration the tracker names, or None when there is no (readable) tracker."""
    path = tracker_path(root)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    try:
        return int(text)
    except ValueError:
        return None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def available_iterations(root: str) -> list[int]:
    """Iterations with a complete checkpoint directory under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit():
            if is_complete(os.path.join(root, name)):
                found.append(int(name[5:]))
    return sorted(found)


def load_problem(root: str, step: int | None = None) -> str | None:
    """Why `root` (``--load``, with optional ``--ckpt-step``) holds no loadable checkpoint."""
    if not os.path.isdir(root):
        return f"--load {root}: no such directory"
    if step is not None:
        if is_complete(checkpoint_dir(root, step)):
            return None
        have = available_iterations(root)
        return (
            f"--ckpt-step {step}: {checkpoint_dir(root, step)} is not a complete checkpoint; "
            f"complete checkpoints in --load {root}: {have or 'none'}"
        )
    iteration = read_tracker(root)
    if iteration is None:
        return (
            f"--load {root} holds no checkpoint (no readable {TRACKER_FILENAME}); "
            "omit --load to start from scratch"
        )
    if not is_complete(checkpoint_dir(root, iteration)):
        return (
            f"--load {root}: {TRACKER_FILENAME} names iteration {iteration}, but "
            f"{checkpoint_dir(root, iteration)} is not a complete checkpoint"
        )
    return None


def iteration_to_load(root: str, step: int | None = None) -> int:
    """The iteration `load_problem` accepted."""
    if step is not None:
        return step
    iteration = read_tracker(root)
    if iteration is None:
        raise FileNotFoundError(load_problem(root, step))
    return iteration
