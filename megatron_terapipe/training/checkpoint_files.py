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


def holds_no_checkpoint(root: str) -> bool:
    """True when `root` is missing or holds neither a tracker nor any checkpoint directory.

    Such a ``--load`` directory is the first run of an auto-resume job (``--save D --load D``);
    leftovers of a save killed before it completed (``iter_*.tmp``) do not count.
    """
    if not os.path.exists(root):
        return True
    if not os.path.isdir(root):
        return False
    if os.path.exists(tracker_path(root)):
        return False
    return not any(
        name.startswith("iter_") and name[5:].isdigit() for name in os.listdir(root)
    )


def is_auto_resume(load: str | None, save: str | None) -> bool:
    """``--load`` and ``--save`` name the same directory: start fresh when it is empty."""
    if load is None or save is None:
        return False
    return os.path.abspath(load) == os.path.abspath(save)


def save_problem(root: str) -> str | None:
    """Why ``--save root`` cannot hold checkpoints (checked before any work is done)."""
    if os.path.exists(root) and not os.path.isdir(root):
        return f"--save {root} is an existing file, not a directory; name a directory"
    parent = os.path.dirname(os.path.abspath(root))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--save {root}: {parent} is a file, so the directory cannot be created"
    return None


def load_problem(root: str, step: int | None = None, save: str | None = None) -> str | None:
    """Why `root` (``--load``, with optional ``--ckpt-step``) holds no loadable checkpoint.

    With ``--save`` naming the same directory and no ``--ckpt-step``, an empty or missing
    directory is fine: the run starts from scratch (Megatron-LM's auto-resume pattern).
    """
    if step is None and is_auto_resume(root, save) and holds_no_checkpoint(root):
        return None
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
        have = available_iterations(root)
        if have:
            return (
                f"--load {root} has no readable {TRACKER_FILENAME}; complete checkpoints: "
                f"{have}; pick one with --ckpt-step {have[-1]}"
            )
        return (
            f"--load {root} holds no checkpoint (no readable {TRACKER_FILENAME}); "
            "omit --load to start from scratch, or give the same directory to --save to "
            "start from scratch when it is empty"
        )
    if not is_complete(checkpoint_dir(root, iteration)):
        have = available_iterations(root)
        hint = f"; load an earlier one with --ckpt-step {have[-1]}" if have else ""
        return (
            f"--load {root}: {TRACKER_FILENAME} names iteration {iteration}, but "
            f"{checkpoint_dir(root, iteration)} is not a complete checkpoint{hint}"
        )
    return None


def last_complete_hint(root: str, but: int | None = None) -> str:
    """``--ckpt-step N`` for the newest complete checkpoint other than `but`, or advice."""
    have = [it for it in available_iterations(root) if it != but]
    if have:
        return f"load the last complete one with --ckpt-step {have[-1]} (complete: {have})"
    return "no other complete checkpoint is in that directory; start without --load"


def iteration_to_load(root: str, step: int | None = None) -> int | None:
    """The iteration `load_problem` accepted; None for an empty auto-resume directory."""
    if step is not None:
        return step
    iteration = read_tracker(root)
    if iteration is None and not holds_no_checkpoint(root):
        raise FileNotFoundError(load_problem(root, step))
    return iteration
