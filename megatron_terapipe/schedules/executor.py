"""Run a token-pipeline schedule (the IR of this package) on megatron-core models.

`get_forward_backward_func(TokenPipelineConfig)` returns a drop-in replacement for the function
megatron-core's `get_forward_backward_func()` returns: same keywords, same return value, same
side effects (DDP no_sync during the step, `finalize_model_grads` at the end). Each rank walks
its own action list from the schedule; compute actions call the user's unchanged
`forward_step_func` on one token slice of one micro-batch, and megatron-core's `backward_step`
per slice; communication actions post one `torch.distributed.batch_isend_irecv` call per group
(ops in megatron-core's order) with per-slice shapes without waiting, and Wait actions block
only where the schedule says (a receive right before the compute that reads it; a forward's
send before that unit's backward, other sends at the end; a sent tensor is kept alive until its
send completes, a forward output deallocated as soon as it has). Nothing in a step synchronises
with the host except those waits: the per-token-loss token count stays on the model's device.

Loss semantics match stock exactly: for loss functions returning (loss, num_tokens, report)
each slice's loss sum is divided by the micro-batch's *total* token count (known before the
first backward of that micro-batch, since its backwards start after its last slice's forward)
and the slices' reports are summed into one per micro-batch. Two-value loss functions are
assumed to return a per-slice token mean; slices are weighted by their length, which is exact
when every token counts (no loss mask) -- use the three-value form for masked losses.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatron_terapipe.compat.megatron_core import (
    backward_step,
    forward_autocast,
    set_moe_aux_loss_scale,
)
from megatron_terapipe.config import TokenPipelineConfig
from megatron_terapipe.model.batch_slicing import slice_batch
from megatron_terapipe.model.positions import install_rope_offset_hooks
from megatron_terapipe.model.slice_context import TokenSliceContext, activate
from megatron_terapipe.model.weight_grad_deferral import (
    DeferredWeightGrads,
    deferring_weight_grads,
    install_weight_grad_deferral,
    split_backward_problems,
)
from megatron_terapipe.schedules.communication import canonical_ops
from megatron_terapipe.schedules.generators import build_schedule, schedule_from_orders
from megatron_terapipe.schedules.ir import (
    BACKWARD,
    FORWARD,
    RECV_PREV,
    SEND_PREV,
    WEIGHT_GRAD,
    CommGroup,
    Compute,
    P2POp,
    Schedule,
    Wait,
)
from megatron_terapipe.schedules.support import check_token_pipeline_support
from megatron_terapipe.schedules.validator import validate_schedule
from megatron_terapipe.timing import StepClock


@lru_cache(maxsize=64)
def _training_schedule(
    name: str, stages: int, microbatches: int, slices: int, chunks: int, split_backward: bool
):
    return validate_schedule(
        build_schedule(name, stages, microbatches, slices, chunks, split_backward=split_backward)
    )


@lru_cache(maxsize=64)
def _forward_only_schedule(name: str, stages: int, microbatches: int, slices: int, chunks: int):
    """The forwards of the training schedule, in its order, with their own communication."""
    full = build_schedule(name, stages, microbatches, slices, chunks)
    orders = [[c for c in full.computes(p) if c.kind == FORWARD] for p in range(stages)]
    schedule = schedule_from_orders(
        f"{name}/forward-only", stages, microbatches, slices, chunks, orders
    )
    return validate_schedule(schedule, forward_only=True)


@dataclass
class ActionRecord:
    """Start/end (seconds since the step began, aligned across pipeline ranks) of one action."""

    kind: str  # "F", "B", "W" or "comm"
    microbatch: int
    token_slice: int
    chunk: int
    start: float
    end: float


class _SlicedDataIterator:
    """What the user's forward_step_func sees: `next()` yields the current slice of the batch.

    The underlying iterator is advanced once per micro-batch, on the first `next()` of that
    micro-batch, so the user's data order is exactly as under stock schedules.
    """

    def __init__(self, underlying: Iterator | None, seq_length: int) -> None:
        self.underlying = underlying
        self.seq_length = seq_length
        self.batches: dict[int, Any] = {}
        self.current: tuple[int, int, int] | None = None  # (microbatch, offset, length)

    def __iter__(self):
        return self

    def __next__(self):
        microbatch, offset, length = self.current
        if microbatch not in self.batches:
            self.batches[microbatch] = next(self.underlying)
        return slice_batch(self.batches[microbatch], self.seq_length, offset, length)

    def done_with(self, microbatch: int) -> None:
        self.batches.pop(microbatch, None)


@dataclass
class _MicrobatchLoss:
    """Per-slice loss outputs of one micro-batch on the last stage."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: torch.Tensor | int = 0  # the micro-batch's token count, summed over its slices
    reports: dict[int, Any] = field(default_factory=dict)
    three_values: bool = True


class _Step:
    """State of one call of the forward-backward function on one rank."""

    def __init__(self, **kw: Any) -> None:
        self.forward_step_func: Callable = kw["forward_step_func"]
        self.models: list = kw["models"]
        self.iterators: list[_SlicedDataIterator] = kw["iterators"]
        self.config = kw["mconfig"]
        self.token_slices: tuple[int, ...] = kw["token_slices"]
        self.seq_length: int = kw["seq_length"]
        self.micro_batch_size: int = kw["micro_batch_size"]
        self.num_microbatches: int = kw["num_microbatches"]
        self.forward_only: bool = kw["forward_only"]
        self.collect_non_loss_data: bool = kw["collect_non_loss_data"]
        self.schedule: Schedule = kw["schedule"]
        self.context: TokenSliceContext = kw["context"]
        self.record: bool = kw["record"]
        groups: _ProcessGroups = kw["groups"]
        self.pp_group = groups.pp
        self.rank = self.pp_group.rank()
        self.num_stages = self.pp_group.size()
        self.num_chunks = len(self.models)
        self.next_rank, self.prev_rank = groups.next_rank, groups.prev_rank
        self.cp_size = groups.cp_size
        self.seq_divisor = groups.tp_size if self.config.sequence_parallel else 1
        # megatron-core's check_first_val_step: a validation step that is not the first one
        # leaves the model's first-micro-batch state (FP8 weight caching) alone
        self.marks_first_microbatch = not (
            self.forward_only and kw["first_val_step"] is not None and not kw["first_val_step"]
        )

        self.inputs: dict[tuple, torch.Tensor | None] = {}  # (m, t, v) -> received activation
        self.outputs: dict[tuple, Any] = {}  # (m, t, v) -> forward output kept for backward
        self.received: dict[tuple, torch.Tensor] = {}  # (kind, m, t, v) -> tensor from a peer
        self.to_send: dict[tuple, torch.Tensor] = {}  # (kind, m, t, v) -> tensor for a peer
        self.losses: dict[int, _MicrobatchLoss] = {}
        self.forward_data_store: list = []
        self.device = kw["device"]
        self.total_num_tokens = torch.zeros([], dtype=torch.int, device=self.device)
        self.timeline: list[ActionRecord] = []
        self.clock = StepClock()
        self.marks: list[tuple[str, int, int, int, object, object]] = []
        self.first_forward_done: set[int] = set()
        # posted P2P batches: op -> its batch; sends still in flight, oldest first
        self.posted: dict[P2POp, _PostedBatch] = {}
        self.sends_in_flight: deque[_PostedBatch] = deque()
        self.grad_sync: _GradSync = kw["grad_sync"]
        actions = self.schedule.stages[self.rank]
        self.last_backward = _last_backward_per_chunk(actions)
        self.last_backward_unit = {v: actions[i].unit for v, i in self.last_backward.items()}
        # units whose backward is split: B queues its weight gradients, W runs them
        self.split_units = {
            a.unit for a in actions if isinstance(a, Compute) and a.kind == WEIGHT_GRAD
        }
        self.weight_grads: dict[tuple, DeferredWeightGrads] = {}
        self.weight_grads_queued = 0

    # -- helpers ------------------------------------------------------------------------------
    def is_first_virtual_stage(self, chunk: int) -> bool:
        return self.rank == 0 and chunk == 0

    def is_last_virtual_stage(self, chunk: int) -> bool:
        return self.rank == self.num_stages - 1 and chunk == self.num_chunks - 1

    def activation_shape(self, token_slice: int) -> tuple[int, int, int]:
        length = self.token_slices[token_slice] // self.seq_divisor
        return (length, self.micro_batch_size, self.config.hidden_size)

    @contextlib.contextmanager
    def timed(self, kind: str, microbatch: int = -1, token_slice: int = -1, chunk: int = -1):
        # A profiler range per action whether or not the timeline is recorded, named as the
        # benchmark's stock recorder names megatron-core's actions (StepClock.range).
        with self.clock.range(kind, microbatch, token_slice, chunk):
            if not self.record:
                yield
                return
            start = self.clock.mark()
            yield
            self.marks.append((kind, microbatch, token_slice, chunk, start, self.clock.mark()))

    def finish_timeline(self) -> None:
        """Turn the step's marks into records (one device synchronisation for the whole step)."""
        if not self.record:
            return
        self.clock.finish()
        self.timeline = [
            ActionRecord(kind, m, t, v, self.clock.seconds(start), self.clock.seconds(end))
            for kind, m, t, v, start, end in self.marks
        ]

    # -- actions ------------------------------------------------------------------------------
    def run(self) -> None:
        if self.record:
            torch.distributed.barrier(group=self.pp_group)
            self.clock.start()
        for index, action in enumerate(self.schedule.stages[self.rank]):
            if isinstance(action, CommGroup):
                self.post(action)
            elif isinstance(action, Wait):
                self.wait(action)
            elif action.kind == FORWARD:
                self.free_completed_sends()
                self.forward(action)
            elif action.kind == WEIGHT_GRAD:
                self.weight_grad(action)
            else:
                self.free_completed_sends()
                self.backward(action, index)
        self.finish_timeline()
        if self.split_units and not self.weight_grads_queued:
            # Checked before the step (split_backward_problems); reaching here means the kernel
            # wrapper was replaced since. Exact all the same (the GEMMs ran inside B), and a
            # raise on this rank alone would leave its peers waiting, so say it instead.
            warnings.warn(
                "--token-pipeline-split-backward: this rank's split backwards deferred no "
                "weight-gradient GEMM (megatron-core's fused_weight_gradient_mlp_cuda is no "
                "longer wrapped), so they ran unsplit",
                RuntimeWarning,
                stacklevel=2,
            )

    def forward(self, action: Compute) -> None:
        m, t, v = action.microbatch, action.token_slice, action.chunk
        timers = self.config.timers
        if timers is not None:
            timers("forward-compute", log_level=2).start()
        model = self.models[v]
        input_tensor = None
        if not self.is_first_virtual_stage(v):
            input_tensor = self.received.pop((FORWARD, m, t, v))
        if v not in self.first_forward_done:
            self.first_forward_done.add(v)
            if self.marks_first_microbatch and hasattr(model, "set_is_first_microbatch"):
                model.set_is_first_microbatch()
        get_attr_wrapped_model(model, "set_input_tensor")([input_tensor])
        iterator = self.iterators[v]
        unit = (m, self.context.offsets[t], self.token_slices[t])
        iterator.current = unit
        with self.timed(FORWARD, m, t, v), self.context.running(v, m, t), forward_autocast(
            self.config
        ):
            output, loss_func = self.forward_step_func(iterator, model)
        if t == len(self.token_slices) - 1:
            iterator.done_with(m)
        if self.is_last_virtual_stage(v):
            output = self.loss_forward(m, t, output, loss_func)
        else:
            self.to_send[(FORWARD, m, t, v)] = output
        if timers is not None:
            timers("forward-compute").stop()
        # As stock's forward step, on every stage: the scale the MoE aux losses backpropagate with.
        set_moe_aux_loss_scale(self.config, self.num_microbatches, self.cp_size, self.device)
        if self.forward_only:
            if t == len(self.token_slices) - 1:
                for s in range(len(self.token_slices)):
                    self.context.release(v, m, s)
            return
        self.inputs[(m, t, v)] = input_tensor
        self.outputs[(m, t, v)] = output

    def loss_forward(self, m: int, t: int, output, loss_func):
        """Run the user's loss on one slice; stash what the micro-batch's report needs."""
        record = self.losses.setdefault(m, _MicrobatchLoss())
        if loss_func is None:
            self.forward_data_store.append(output)
            return output
        if self.collect_non_loss_data:
            record.reports[t] = loss_func(output, non_loss_data=True)
            self.finish_microbatch_report(m)
            return output
        outputs = loss_func(output)
        if len(outputs) == 3:
            loss, num_tokens, report = outputs
            record.num_tokens = record.num_tokens + num_tokens
            self.total_num_tokens += num_tokens.to(self.total_num_tokens.dtype)
        elif len(outputs) == 2:
            loss, report = outputs
            record.three_values = False
        else:
            raise ValueError(
                f"loss function returned {len(outputs)} values; expected 2 (loss, report) or 3 "
                "(loss, num_tokens, report) as with megatron-core's schedules"
            )
        record.losses[t] = loss
        record.reports[t] = report
        self.finish_microbatch_report(m)
        return loss

    def finish_microbatch_report(self, m: int) -> None:
        """Once every slice of micro-batch m has its report, store one report like stock does."""
        record = self.losses[m]
        if len(record.reports) < len(self.token_slices):
            return
        reports = [record.reports[t] for t in range(len(self.token_slices))]
        if self.collect_non_loss_data:
            self.forward_data_store.append(reports)
        elif record.three_values:
            self.forward_data_store.append(_sum_reports(reports))
        else:
            weights = [length / self.seq_length for length in self.token_slices]
            self.forward_data_store.append(_weighted_reports(reports, weights))
        record.reports.clear()

    def scaled_loss(self, m: int, t: int) -> torch.Tensor:
        """The slice's share of the loss the stock schedule would backpropagate."""
        record = self.losses[m]
        loss = record.losses.pop(t)
        cp_size = self.cp_size
        if record.three_values:
            if self.config.calculate_per_token_loss:
                return loss
            return loss / torch.clamp(record.num_tokens, min=1) / self.num_microbatches
        weight = self.token_slices[t] / self.seq_length
        return loss * weight * cp_size / self.num_microbatches

    def backward(self, action: Compute, index: int) -> None:
        m, t, v = action.microbatch, action.token_slice, action.chunk
        key = (m, t, v)
        split = key in self.split_units
        last_of_chunk = self.last_backward.get(v) == index
        if last_of_chunk:
            self.grad_sync.before_last_backward(v, split)
        input_tensor = self.inputs.pop(key)
        output = self.outputs.pop(key)
        if self.is_last_virtual_stage(v):
            output, output_grad = self.scaled_loss(m, t), None
        else:
            output_grad = self.received.pop((BACKWARD, m, t, v))
        with (
            self.timed(BACKWARD, m, t, v),
            self.context.running(v, m, t),
            deferring_weight_grads(self.context) if split else contextlib.nullcontext() as queue,
        ):
            input_grad = backward_step(input_tensor, output, output_grad, self.config)
        if split:
            self.weight_grads[key] = queue
        self.context.release(v, m, t)
        if last_of_chunk:
            self.grad_sync.after_last_backward(v, split)
        if not self.is_first_virtual_stage(v):
            self.to_send[(BACKWARD, m, t, v)] = input_grad

    def weight_grad(self, action: Compute) -> None:
        """A split backward's weight-gradient GEMMs, queued by its B action."""
        self.free_completed_sends()
        timers = self.config.timers
        if timers is not None:
            timers("backward-compute", log_level=2).start()
        queue = self.weight_grads.pop(action.unit)
        with self.timed(WEIGHT_GRAD, *action.unit):
            queue.run()
        self.weight_grads_queued += queue.queued
        if timers is not None:
            timers("backward-compute").stop()
        chunk = action.chunk
        if self.last_backward_unit.get(chunk) == action.unit:
            self.grad_sync.after_split_last_backward(chunk)

    def post(self, group: CommGroup) -> None:
        """Post the group's ops in one batched call; nothing waits here."""
        batch = _PostedBatch()
        p2p_ops = []
        for op in canonical_ops(group.ops):  # the order the network model checked
            key = (op.kind, op.microbatch, op.token_slice, op.chunk)
            if op.is_send:
                tensor = self.to_send.pop(key)
                batch.sends.append((key, tensor))
            else:
                tensor = torch.empty(
                    self.activation_shape(op.token_slice),
                    dtype=self.config.pipeline_dtype,
                    device=self.device,
                    requires_grad=(op.op == RECV_PREV and not self.forward_only),
                )
                batch.recvs.append((key, tensor))
            peer = self.prev_rank if op.op in (SEND_PREV, RECV_PREV) else self.next_rank
            post = torch.distributed.isend if op.is_send else torch.distributed.irecv
            p2p_ops.append(torch.distributed.P2POp(post, tensor, peer, self.pp_group))
            self.posted[op] = batch
        with self.timed("comm"):
            batch.requests = torch.distributed.batch_isend_irecv(p2p_ops) if p2p_ops else []
        if batch.sends:
            self.sends_in_flight.append(batch)

    def wait(self, action: Wait) -> None:
        """Block until the batches holding these ops have completed; hand over what arrived."""
        with self.timed("comm"):
            for op in action.ops:
                self.complete(self.posted.pop(op))

    def complete(self, batch: _PostedBatch) -> None:
        if batch.completed:
            return
        for request in batch.requests:
            request.wait()
        batch.completed = True
        for key, tensor in batch.recvs:
            self.received[key] = tensor
        self.release_sends(batch)

    def release_sends(self, batch: _PostedBatch) -> None:
        for key, tensor in batch.sends:
            if key[0] == FORWARD:
                deallocate_output_tensor(tensor, self.config.deallocate_pipeline_outputs)
        batch.sends.clear()

    def free_completed_sends(self) -> None:
        """Deallocate forward outputs whose sends have completed (memory only; no waiting)."""
        while self.sends_in_flight:
            batch = self.sends_in_flight[0]
            if not batch.completed and not all(r.is_completed() for r in batch.requests):
                return
            self.sends_in_flight.popleft()
            if not batch.recvs:
                batch.completed = True
            self.release_sends(batch)


@dataclass(frozen=True)
class _ProcessGroups:
    """The groups and peers a step runs on: a passed `p2p_communicator` / `pg_collection`
    (megatron-core's keywords) where given, megatron-core's global groups otherwise."""

    pp: Any
    next_rank: int
    prev_rank: int
    tp_size: int
    cp_size: int

    @classmethod
    def of(cls, config, p2p_communicator=None, pg_collection=None) -> _ProcessGroups:
        if p2p_communicator is not None:
            pp = p2p_communicator.pp_group
        elif pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
            pp = pg_collection.pp
        else:
            pp = parallel_state.get_pipeline_model_parallel_group()
        communicator = p2p_communicator or P2PCommunicator(pp, config)

        def size(name: str, fallback: Callable[[], int]) -> int:
            group = getattr(pg_collection, name, None) if pg_collection is not None else None
            return group.size() if group is not None else fallback()

        return cls(
            pp=pp,
            next_rank=communicator.next_rank,
            prev_rank=communicator.prev_rank,
            tp_size=size("tp", parallel_state.get_tensor_model_parallel_world_size),
            cp_size=size("cp", parallel_state.get_context_parallel_world_size),
        )


@dataclass
class _PostedBatch:
    """One batched P2P call in flight: its requests and the tensors it reads or fills."""

    requests: list = field(default_factory=list)
    sends: list[tuple[tuple, torch.Tensor]] = field(default_factory=list)
    recvs: list[tuple[tuple, torch.Tensor]] = field(default_factory=list)
    completed: bool = False


def _last_backward_per_chunk(actions: Sequence) -> dict[int, int]:
    """Index of each chunk's last backward in a rank's list (where its grad sync may start)."""
    last: dict[int, int] = {}
    for index, action in enumerate(actions):
        if isinstance(action, Compute) and action.kind == BACKWARD:
            last[action.chunk] = index
    return last


def model_device(models: Sequence[torch.nn.Module]) -> torch.device:
    """Where the model lives: every tensor the step hands to torch.distributed goes there."""
    for model in models:
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _sum_reports(reports: Sequence[Any]) -> Any:
    first = reports[0]
    if isinstance(first, dict):
        return {key: _sum_reports([r[key] for r in reports]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_sum_reports(list(items)) for items in zip(*reports))
    if isinstance(first, torch.Tensor):
        total = first.clone()
        for other in reports[1:]:
            total = total + other
        return total
    return sum(reports)


def _weighted_reports(reports: Sequence[Any], weights: Sequence[float]) -> Any:
    first = reports[0]
    if isinstance(first, dict):
        return {key: _weighted_reports([r[key] for r in reports], weights) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_weighted_reports(list(items), weights) for items in zip(*reports))
    total = first * weights[0]
    for other, weight in zip(reports[1:], weights[1:]):
        total = total + other * weight
    return total


class _GradSync:
    """DDP no_sync over the step, lifted per chunk as megatron-core's schedules do.

    Without `grad_sync_func`: right before the chunk's last backward of the step, so that with
    `overlap_grad_reduce` DDP's hooks dispatch the chunk's bucket reductions while that backward
    (and the other chunks' later work) still runs. With `grad_sync_func` (Megatron-LM's
    `--align-grad-reduce`: start_grad_sync per chunk): right after the chunk's last backward,
    followed by that call, so each chunk's reduction is launched once, explicitly, as soon as its
    gradients are complete.

    A split last backward (B then W) keeps no_sync over its B: DDP's hooks run during B, before W
    has added the weight gradients to `main_grad`. The sync starts after W instead: with
    `grad_sync_func` as above, otherwise, when DDP overlaps its reduction, by DDP's own
    `start_grad_sync` (without overlap `finalize_model_grads` reduces, as always)."""

    def __init__(self, config, models: list, enabled: bool) -> None:
        self.config = config
        self.models = models
        self.contexts: list = []
        self.started: set[int] = set()
        self.explicit = config.grad_sync_func is not None
        if not enabled:
            return
        for func in _no_sync_funcs(config, len(models)):
            ctx = (func or contextlib.nullcontext)()
            ctx.__enter__()
            self.contexts.append(ctx)

    def before_last_backward(self, chunk: int, split: bool) -> None:
        if not self.explicit and not split:
            self.release(chunk)

    def after_last_backward(self, chunk: int, split: bool) -> None:
        if self.explicit and not split:
            self.start(chunk)

    def after_split_last_backward(self, chunk: int) -> None:
        """The W of the chunk's last backward has run: its gradients are complete."""
        self.start(chunk, dispatch_overlapped=True)

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
        elif dispatch_overlapped and _overlaps_grad_reduce(model):
            model.start_grad_sync()

    def finish(self) -> None:
        """Chunks that ran no backward on this rank still leave no_sync and sync."""
        for chunk in range(len(self.contexts)):
            self.start(chunk)


def _no_sync_funcs(config, num_chunks: int) -> list[Callable | None]:
    """Each chunk's DDP no_sync (megatron-core's no_sync_func rule: a list gives one per chunk,
    a single callable covers the first chunk only); None where there is none."""
    no_sync = config.no_sync_func
    if no_sync is None:
        return [None] * num_chunks
    if isinstance(no_sync, list):
        return list(no_sync)
    return [no_sync] + [None] * (num_chunks - 1)


def _unsynced_overlap(config, models: Sequence[torch.nn.Module]) -> list[str]:
    """A split backward runs DDP's hooks before W adds the weight gradients; with
    overlap_grad_reduce only no_sync keeps them from starting the reduction too early."""
    funcs = _no_sync_funcs(config, len(models))
    missing = [i for i, model in enumerate(models) if _overlaps_grad_reduce(model)
               and (i >= len(funcs) or funcs[i] is None)]
    if not missing:
        return []
    return [
        f"overlap_grad_reduce without a no_sync_func for model chunk(s) {missing}: set "
        "config.no_sync_func to one model.no_sync per chunk, as Megatron-LM does"
    ]


def _overlaps_grad_reduce(model: torch.nn.Module) -> bool:
    """Whether `model` is megatron-core DDP with overlap_grad_reduce (reductions started by
    hooks during the backward, or by an explicit start_grad_sync)."""
    ddp_config = getattr(model, "ddp_config", None)
    return bool(getattr(ddp_config, "overlap_grad_reduce", False)) and hasattr(
        model, "start_grad_sync"
    )


class TokenPipelineForwardBackward:
    """The callable `get_forward_backward_func(config)` returns.

    After each call, `last_timeline` holds this rank's per-action records when
    `config.record_timeline` is set, and `last_schedule` the schedule that ran.
    """

    def __init__(self, config: TokenPipelineConfig) -> None:
        self.config = config
        self.last_timeline: list[ActionRecord] = []
        self.last_schedule: Schedule | None = None
        self.last_token_slices: tuple[int, ...] = ()
        # first chunks of the model lists already checked for split backwards
        self._split_checked: weakref.WeakSet = weakref.WeakSet()

    def __call__(
        self,
        *,
        forward_step_func: Callable,
        data_iterator: Iterator | list | None,
        model: torch.nn.Module | list,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: int | None = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: bool | None = None,
        adjust_tensor_shapes_fn: Callable | None = None,
        p2p_communicator=None,
        pg_collection=None,
        force_all_reduce: bool | None = False,
    ) -> list:
        models = model if isinstance(model, list) else [model]
        if isinstance(data_iterator, list):
            if len(data_iterator) != len(models):
                raise ValueError(
                    f"token pipeline: {len(data_iterator)} data iterators for {len(models)} model "
                    "chunks; pass one iterator per chunk (as megatron-core's interleaved schedule)"
                )
            iterators = data_iterator
        elif len(models) > 1:
            raise ValueError(
                "token pipeline: with several model chunks pass a list of data iterators, one per "
                "chunk"
            )
        else:
            iterators = [data_iterator]
        if adjust_tensor_shapes_fn is not None:
            raise ValueError("token pipeline: adjust_tensor_shapes_fn is not supported")
        if decoder_seq_length not in (None, seq_length):
            raise ValueError(
                "token pipeline: encoder-decoder models (decoder_seq_length) are not supported"
            )
        mconfig = get_model_config(models[0])
        check_token_pipeline_support(mconfig, models)
        groups = _ProcessGroups.of(mconfig, p2p_communicator, pg_collection)
        token_slices = self.config.resolve_token_slices(
            seq_length, multiple_of=groups.tp_size if mconfig.sequence_parallel else 1
        )
        shape = (
            self.config.schedule,
            groups.pp.size(),
            num_microbatches,
            len(token_slices),
            len(models),
        )
        split_backward = self.config.split_backward and not forward_only
        if split_backward and models[0] not in self._split_checked:
            problems = split_backward_problems(mconfig, models) + _unsynced_overlap(
                mconfig, models
            )
            if problems:
                raise ValueError(
                    "token pipeline: split_backward (--token-pipeline-split-backward) cannot run "
                    "exactly with " + "; ".join(problems)
                )
            install_weight_grad_deferral()
            self._split_checked.add(models[0])
        schedule = (
            _forward_only_schedule(*shape)
            if forward_only
            else _training_schedule(*shape, split_backward)
        )
        install_rope_offset_hooks(models)
        device = model_device(models)

        timers = mconfig.timers
        if timers is not None:
            timers("forward-backward", log_level=1).start(barrier=mconfig.barrier_with_L1_time)
        context = TokenSliceContext(token_slices, requires_grad=not forward_only)
        grad_sync = _GradSync(mconfig, models, enabled=not forward_only)
        step = _Step(
            forward_step_func=forward_step_func,
            models=models,
            iterators=[_SlicedDataIterator(it, seq_length) for it in iterators],
            mconfig=mconfig,
            token_slices=token_slices,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            num_microbatches=num_microbatches,
            forward_only=forward_only,
            collect_non_loss_data=collect_non_loss_data,
            schedule=schedule,
            context=context,
            record=self.config.record_timeline,
            groups=groups,
            first_val_step=first_val_step,
            device=device,
            grad_sync=grad_sync,
        )
        with activate(context):
            step.run()
        grad_sync.finish()
        if context.num_stored():
            raise RuntimeError(
                f"token pipeline: {context.num_stored()} KV entries left after the step "
                "(schedule did not run every backward)"
            )
        if mconfig.finalize_model_grads_func is not None and not forward_only:
            finalize_kwargs = {"force_all_reduce": force_all_reduce}
            if pg_collection is not None:
                finalize_kwargs["pg_collection"] = pg_collection
            mconfig.finalize_model_grads_func(
                models,
                step.total_num_tokens if mconfig.calculate_per_token_loss else None,
                **finalize_kwargs,
            )
        if timers is not None:
            timers("forward-backward").stop()
        self.last_timeline = step.timeline
        self.last_schedule = schedule
        self.last_token_slices = token_slices
        return step.forward_data_store


def get_forward_backward_func(config: TokenPipelineConfig) -> TokenPipelineForwardBackward:
    """The token-pipeline counterpart of megatron-core's `get_forward_backward_func()`."""
    if not isinstance(config, TokenPipelineConfig):
        raise TypeError(
            f"get_forward_backward_func expects a TokenPipelineConfig, got {type(config).__name__}"
        )
    return TokenPipelineForwardBackward(config)
