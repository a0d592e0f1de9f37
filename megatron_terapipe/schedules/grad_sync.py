"""When each model chunk's data-parallel gradient reduction may start, and how a step starts it.

The rule is stated once, here, and read from a rank's action list (`grad_sync_points`): a
chunk's gradients are complete after the step's last backward on that chunk or, when that
backward is split, after its W, which adds the deferred weight gradients to `main_grad`. The
validator proves that no W of the chunk runs past that point (the reduction reads `main_grad`
there); the executor's DDP policy (`GradSync`) lifts no_sync and starts the reduction there.

This module imports neither torch nor megatron-core, so the validator (and the pure-Python
tools that use it) can read the rule without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_terapipe.schedules.ir import BACKWARD, WEIGHT_GRAD, Action, Compute

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GradSyncPoint:
    """Where one chunk's gradients become complete in a rank's action list.

    `last_backward`: index of the chunk's last backward (B) action; `complete`: index of the
    action after which `main_grad` holds every gradient of the step, the W of that backward
    when it is split, else the backward itself.
    """

    chunk: int
    last_backward: int
    complete: int

    @property
    def split(self) -> bool:
        """The chunk's last backward is split: its weight gradients land at its W, later."""
        return self.complete != self.last_backward


def grad_sync_points(actions: Sequence[Action]) -> dict[int, GradSyncPoint]:
    """Each chunk's gradient sync point in one rank's action list (chunks that run no backward
    on this rank have none)."""
    last_backward: dict[int, int] = {}
    weight_grad_at: dict[tuple[int, int, int], int] = {}
    for index, action in enumerate(actions):
        if isinstance(action, Compute) and action.kind == BACKWARD:
            last_backward[action.chunk] = index
        elif isinstance(action, Compute) and action.kind == WEIGHT_GRAD:
            weight_grad_at.setdefault(action.unit, index)
    points = {}
    for chunk, index in last_backward.items():
        unit = actions[index].unit
        points[chunk] = GradSyncPoint(chunk, index, weight_grad_at.get(unit, index))
    return points


class GradSync:
    """DDP no_sync over the step, lifted per chunk at its sync point as megatron-core's
    schedules do.

    Without `grad_sync_func`: right before the chunk's last backward of the step, so that with
    `overlap_grad_reduce` DDP's hooks dispatch the chunk's bucket reductions while that backward
    (and the other chunks' later work) still runs. With `grad_sync_func` (Megatron-LM's
    `--align-grad-reduce`: start_grad_sync per chunk): right after the chunk's last backward,
    followed by that call, so each chunk's reduction is launched once, explicitly, as soon as its
    gradients are complete.

    A split last backward (B then W) keeps no_sync over its B: DDP's hooks run during B, before W
    has added the weight gradients to `main_grad`. The sync starts after W instead: with
    `grad_sync_func` as above, otherwise, when DDP overlaps its reduction, by DDP's own
    `start_grad_sync` (without overlap `finalize_model_grads` reduces, as always).

    The step calls `before(index)` and `after(index)` around every compute action of the rank's
    list; `enabled=False` (forward only) leaves DDP alone.
    """

    def __init__(self, config: Any, models: list, points: dict[int, GradSyncPoint],
                 enabled: bool) -> None:
        self.config = config
        self.models = models
        self.contexts: list = []
        self.started: set[int] = set()
        self.explicit = config.grad_sync_func is not None
        self._at_backward = {p.last_backward: p for p in points.values()}
        self._at_weight_grad = {p.complete: p for p in points.values() if p.split}
        if not enabled:
            return
        for func in no_sync_funcs(config, len(models)):
            ctx = (func or contextlib.nullcontext)()
            ctx.__enter__()
            self.contexts.append(ctx)

    def before(self, index: int) -> None:
        """Before action `index` runs: an unsplit last backward reduces as it goes unless the
        reduction is launched explicitly."""
        point = self._at_backward.get(index)
        if point is not None and not self.explicit and not point.split:
            self.release(point.chunk)

    def after(self, index: int) -> None:
        """After action `index` ran: where it completed a chunk's gradients, start the sync."""
        point = self._at_backward.get(index)
        if point is not None and self.explicit and not point.split:
            self.start(point.chunk)
        point = self._at_weight_grad.get(index)
        if point is not None:
            self.start(point.chunk, dispatch_overlapped=True)

    def release(self, chunk: int) -> None:
        """Leave no_sync for `chunk`: its next backward reduces gradients as they are ready."""
        if chunk < len(self.contexts) and self.contexts[chunk] is not None:
            self.contexts[chunk].__exit__(None, None, None)
            self.contexts[chunk] = None

    def start(self, chunk: int, dispatch_overlapped: bool = False) -> None:
        """Launch `chunk`'s remaining gradient reduction (megatron-core's grad_sync_func; with
        `dispatch_overlapped`, DDP's start_grad_sync when DDP overlaps and no hook did)."""
        if chunk >= len(self.contexts) or chunk in self.started:
            return
        self.release(chunk)
        self.started.add(chunk)
        grad_sync = self.config.grad_sync_func
        if isinstance(grad_sync, list):
            grad_sync = grad_sync[chunk]
        model = self.models[chunk]
        if grad_sync is not None:
            grad_sync(model.parameters())
        elif dispatch_overlapped and overlaps_grad_reduce(model):
            model.start_grad_sync()

    def finish(self) -> None:
        """Chunks that ran no backward on this rank still leave no_sync and sync."""
        for chunk in range(len(self.contexts)):
            self.start(chunk)


def no_sync_funcs(config: Any, num_chunks: int) -> list[Callable | None]:
    """Each chunk's DDP no_sync (megatron-core's no_sync_func rule: a list gives one per chunk,
    a single callable covers the first chunk only); None where there is none."""
    no_sync = config.no_sync_func
    if no_sync is None:
        return [None] * num_chunks
    if isinstance(no_sync, list):
        return list(no_sync)
    return [no_sync] + [None] * (num_chunks - 1)


def unsynced_overlap(config: Any, models: Sequence[torch.nn.Module]) -> list[str]:
    """A split backward runs DDP's hooks before W adds the weight gradients; with
    overlap_grad_reduce only no_sync keeps them from starting the reduction too early."""
    funcs = no_sync_funcs(config, len(models))
    missing = [i for i, model in enumerate(models) if overlaps_grad_reduce(model)
               and (i >= len(funcs) or funcs[i] is None)]
    if not missing:
        return []
    return [
        f"overlap_grad_reduce without a no_sync_func for model chunk(s) {missing}: set "
        "config.no_sync_func to one model.no_sync per chunk, as Megatron-LM does"
    ]


def overlaps_grad_reduce(model: torch.nn.Module) -> bool:
    """Whether `model` is megatron-core DDP with overlap_grad_reduce (reductions started by
    hooks during the backward, or by an explicit start_grad_sync)."""
    ddp_config = getattr(model, "ddp_config", None)
    return bool(getattr(ddp_config, "overlap_grad_reduce", False)) and hasattr(
        model, "start_grad_sync"
    )
