"""Run a token-pipeline schedule (the IR of this package) on megatron-core models.

`get_forward_backward_func(TokenPipelineConfig)` returns a drop-in replacement for the function
megatron-core's `get_forward_backward_func()` returns: same keywords, same return value, same
side effects (DDP no_sync during the step, `finalize_model_grads` at the end). This module is the
setup: it checks megatron-core's keywords, picks the validated schedule for the step's shape and
hands the step to its parts, each named for its job:

- `step_state`: what the step runs on (`StepState`, the process groups, the model's device);
- `step_loop`: the rank walks its action list (forwards, backwards, split weight gradients);
- `p2p_posting`: the schedule's CommGroups posted without waiting, and its Waits;
- `step_report`: per-slice losses scaled as stock scales them, one report per micro-batch;
- `grad_sync`: DDP's gradient sync, started where the schedule completes a chunk's gradients;
- `step_timeline`: the per-action timeline (`last_timeline`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from functools import lru_cache

import torch
from megatron.core.utils import get_model_config

from megatron_terapipe.config import TokenPipelineConfig
from megatron_terapipe.model.positions import install_rope_offset_hooks
from megatron_terapipe.model.slice_context import TokenSliceContext, activate
from megatron_terapipe.model.weight_grad_deferral import (
    check_split_backward,
    install_weight_grad_deferral,
)
from megatron_terapipe.schedules.generators import build_schedule, schedule_from_orders
from megatron_terapipe.schedules.grad_sync import GradSync, grad_sync_points, unsynced_overlap
from megatron_terapipe.schedules.ir import FORWARD, Schedule
from megatron_terapipe.schedules.sliced_data import SlicedDataIterator
from megatron_terapipe.schedules.step_loop import StepRunner
from megatron_terapipe.schedules.step_state import (
    ProcessGroups,
    StepState,
    first_microbatch_marked,
    model_device,
)
from megatron_terapipe.schedules.step_timeline import ActionRecord
from megatron_terapipe.schedules.support import check_token_pipeline_support
from megatron_terapipe.schedules.validator import validate_schedule

__all__ = ["ActionRecord", "TokenPipelineForwardBackward", "get_forward_backward_func"]


@lru_cache(maxsize=64)
def _training_schedule(
    name: str, stages: int, microbatches: int, slices: int, chunks: int, split_backward: bool
) -> Schedule:
    return validate_schedule(
        build_schedule(name, stages, microbatches, slices, chunks, split_backward=split_backward)
    )


@lru_cache(maxsize=64)
def _forward_only_schedule(
    name: str, stages: int, microbatches: int, slices: int, chunks: int
) -> Schedule:
    """The forwards of the training schedule, in its order, with their own communication."""
    full = build_schedule(name, stages, microbatches, slices, chunks)
    orders = [[c for c in full.computes(p) if c.kind == FORWARD] for p in range(stages)]
    schedule = schedule_from_orders(
        f"{name}/forward-only", stages, microbatches, slices, chunks, orders
    )
    return validate_schedule(schedule, forward_only=True)


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
        groups = ProcessGroups.of(mconfig, p2p_communicator, pg_collection)
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
            check_split_backward(mconfig, models, unsynced_overlap(mconfig, models))
            install_weight_grad_deferral()
            self._split_checked.add(models[0])
        schedule = (
            _forward_only_schedule(*shape)
            if forward_only
            else _training_schedule(*shape, split_backward)
        )
        install_rope_offset_hooks(models)

        timers = mconfig.timers
        if timers is not None:
            timers("forward-backward", log_level=1).start(barrier=mconfig.barrier_with_L1_time)
        context = TokenSliceContext(token_slices, requires_grad=not forward_only)
        state = StepState(
            forward_step_func=forward_step_func,
            models=models,
            iterators=[SlicedDataIterator(it, seq_length) for it in iterators],
            config=mconfig,
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
            marks_first_microbatch=first_microbatch_marked(forward_only, first_val_step),
            device=model_device(models),
        )
        grad_sync = GradSync(
            mconfig, models, grad_sync_points(state.actions), enabled=not forward_only
        )
        step = StepRunner(state, grad_sync)
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
                step.losses.total_num_tokens if mconfig.calculate_per_token_loss else None,
                **finalize_kwargs,
            )
        if timers is not None:
            timers("forward-backward").stop()
        self.last_timeline = step.timeline.records
        self.last_schedule = schedule
        self.last_token_slices = token_slices
        return step.losses.forward_data_store


def get_forward_backward_func(config: TokenPipelineConfig) -> TokenPipelineForwardBackward:
    """The token-pipeline counterpart of megatron-core's `get_forward_backward_func()`."""
    if not isinstance(config, TokenPipelineConfig):
        raise TypeError(
            f"get_forward_backward_func expects a TokenPipelineConfig, got {type(config).__name__}"
        )
    return TokenPipelineForwardBackward(config)
