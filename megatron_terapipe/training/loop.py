"""Train and evaluate: Megatron-LM's train_step / evaluate / train, for this trainer's flags.

The schedule is the one thing that differs between a stock and a token-pipeline run: it comes
from `megatron_lm.get_forward_backward_func(args)`, and everything else (data order, loss
reduction, optimizer step, LR schedule, checkpoints) is shared.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from typing import Any

import torch

from megatron_terapipe.training import reporting
from megatron_terapipe.training.initialize import print_rank_0, print_rank_last
from megatron_terapipe.training.model import attach_schedule_hooks


def _reduce_losses(losses_reduced: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Token-weighted mean over micro-batches and data-parallel ranks (Megatron-LM's rule)."""
    from megatron.core import parallel_state

    reduced: dict[str, torch.Tensor] = {}
    if not losses_reduced:
        return reduced
    for key in losses_reduced[0]:
        values = [item[key].view(-1).float() for item in losses_reduced]
        if values[0].numel() == 2:
            total = torch.vstack(values).sum(dim=0)
            torch.distributed.all_reduce(
                total, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
            reduced[key] = total[0] / total[1]
        else:
            reduced[key] = torch.cat(values).mean()
    return reduced


def _call(forward_backward_func, forward_step_func, data_iterator, model, args, forward_only):
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    return forward_backward_func(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=get_num_microbatches(),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length,
        forward_only=forward_only,
    )


def train_step(
    args: Namespace,
    forward_step_func: Callable,
    data_iterator: Any,
    model: list,
    optimizer,
    scheduler,
    forward_backward_func: Callable,
) -> tuple[dict[str, torch.Tensor], int, float | None]:
    """One optimizer step; returns (losses on the last stage, skipped, grad norm)."""
    from megatron.core import parallel_state

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = _call(
        forward_backward_func, forward_step_func, data_iterator, model, args, forward_only=False
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
        skipped = 0
    else:
        skipped = 1
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return _reduce_losses(losses_reduced), skipped, grad_norm
    return {}, skipped, grad_norm


def evaluate(
    args: Namespace,
    forward_step_func: Callable,
    data_iterator: Any,
    model: list,
    forward_backward_func: Callable,
) -> dict[str, float]:
    """Mean loss over --eval-iters forward-only steps (last pipeline stage; {} elsewhere)."""
    from megatron.core import parallel_state

    for chunk in model:
        chunk.eval()
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(args.eval_iters):
            losses = _call(
                forward_backward_func, forward_step_func, data_iterator, model, args, True
            )
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                for item in losses:
                    for key, value in item.items():
                        totals[key] = totals.get(key, 0) + value.view(-1).float()
            args.consumed_valid_samples += args.global_batch_size
    for chunk in model:
        chunk.train()
    result = {}
    for key, total in totals.items():
        if total.numel() == 2:
            torch.distributed.all_reduce(
                total, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
            )
            result[key] = (total[0] / total[1]).item()
        else:
            result[key] = (total / max(1, args.eval_iters)).item()
    return result


def train(
    args: Namespace,
    forward_step_func: Callable,
    model: list,
    optimizer,
    scheduler,
    train_iterator: Any,
    valid_iterator: Any,
    forward_backward_func: Callable,
    iteration: int,
    flops_so_far: float,
    save_fn: Callable[[int, float], None] | None,
) -> int:
    """Run iterations iteration+1..train_iters (or until --exit-interval); returns the last."""
    from megatron.core.timers import Timers

    timers = Timers(args.timing_log_level, "minmax")
    config = _model_config(model)
    config.grad_scale_func = optimizer.scale_loss
    config.timers = timers
    attach_schedule_hooks(config, model, args.align_grad_reduce)

    writer = reporting.tensorboard_writer(args)
    for chunk in model:
        chunk.train()
    data = train_iterator
    chunk_arg = model  # a list, as Megatron-LM passes it (megatron-core unwraps one chunk)
    batch = args.global_batch_size
    interval_losses: dict[str, float] = {}
    advanced = skipped_total = nan_total = 0
    print_rank_0(f"> training with schedule: {reporting.schedule_name(args)}")
    timers("interval-time", log_level=0).start(barrier=True)
    last_saved = None
    start_iteration = iteration
    while iteration < args.train_iters:
        losses, skipped, grad_norm = train_step(
            args, forward_step_func, data, chunk_arg, optimizer, scheduler, forward_backward_func
        )
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += batch
        flops_so_far += reporting.num_floating_point_operations(args, batch)
        skipped_total += skipped
        if skipped:
            nan_total += int(any(not torch.isfinite(v).all() for v in losses.values()))
        else:
            advanced += 1
            for key, value in losses.items():
                interval_losses[key] = interval_losses.get(key, 0.0) + value.item()
        # MoE aux losses: added every iteration and averaged over the advanced ones, after the
        # lm loss in the line, as Megatron-LM's training_log does (its tracker on every rank).
        for key, value in reporting.moe_aux_losses(args, iteration, writer).items():
            interval_losses[key] = interval_losses.get(key, 0.0) + value

        learning_rate = optimizer.param_groups[0]["lr"]
        if writer is not None and iteration % args.tensorboard_log_interval == 0:
            writer.add_scalar("learning-rate", learning_rate, iteration)
            for key, value in losses.items():
                writer.add_scalar(key, value.item(), iteration)
                writer.add_scalar(key + " vs samples", value.item(), args.consumed_train_samples)
            if grad_norm is not None:
                writer.add_scalar("grad-norm", grad_norm, iteration)
        if iteration % args.log_interval == 0:
            elapsed = timers("interval-time").elapsed(barrier=True)
            per_iteration = elapsed / args.log_interval
            means = {k: v / max(1, advanced) for k, v in interval_losses.items()}
            print_rank_last(
                reporting.iteration_line(
                    args,
                    iteration,
                    per_iteration,
                    learning_rate,
                    means,
                    float(optimizer.get_loss_scale().item()),
                    grad_norm,
                    skipped_total,
                    nan_total,
                )
            )
            if writer is not None:
                writer.add_scalar("iteration-time", per_iteration, iteration)
            interval_losses, advanced, skipped_total, nan_total = {}, 0, 0, 0
            if args.timing_log_level > 0:
                timers.log(
                    ["forward-backward", "optimizer", "forward-compute", "backward-compute"],
                    normalizer=args.log_interval,
                )

        # Evaluation and checkpointing time is not training time (Megatron-LM stops the
        # interval timer around both).
        timers("interval-time").stop()
        if args.eval_iters and valid_iterator is not None and iteration % args.eval_interval == 0:
            valid = evaluate(
                args, forward_step_func, valid_iterator, chunk_arg, forward_backward_func
            )
            if valid:
                print_rank_last(reporting.validation_block(f"iteration {iteration}", valid))
                if writer is not None:
                    for key, value in valid.items():
                        writer.add_scalar(f"{key} validation", value, iteration)
            if getattr(args, "num_experts", None) is not None:
                # What evaluation recorded is not the next step's (Megatron-LM clears it too).
                from megatron_terapipe.compat.megatron_core import clear_moe_metrics

                clear_moe_metrics()

        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if save_fn is not None and (
            (args.save_interval and iteration % args.save_interval == 0) or exiting
        ):
            save_fn(iteration, flops_so_far)
            last_saved = iteration
        if exiting:
            print_rank_0(f"exiting program at iteration {iteration}")
            break
        timers("interval-time", log_level=0).start(barrier=True)
    if save_fn is not None and last_saved != iteration and iteration > start_iteration:
        save_fn(iteration, flops_so_far)
    if writer is not None:
        writer.flush()
    return iteration


def _model_config(model: list):
    from megatron.core.utils import get_model_config

    return get_model_config(model[0])
