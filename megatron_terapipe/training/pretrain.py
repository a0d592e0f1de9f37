"""The pre-training entry point: parse and validate, then initialise, build, load, train, save.

Order matters for "bad input exits before training": flags are parsed and validated in pure
Python first (exit status 2 with every problem listed); only then are torch.distributed,
megatron-core, models and datasets touched.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence

EXIT_BAD_ARGS = 2


class StartupConfigurationError(RuntimeError):
    """A flag problem only visible once ranks exist (e.g. no slicing fits the memory cap)."""


def _is_rank_0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def report_error(message: str, every_rank: bool = False) -> int:
    """One `pretrain_gpt.py: error:` line set, from rank 0 only: every rank finds the same
    problem, and torchrun would print it once per rank. A problem only one rank can see
    (`every_rank`) is printed by that rank. Returns the exit status; a rank that prints
    nothing returns only after rank 0 has had the time to print (torchrun stops the other
    ranks as soon as one exits)."""
    if every_rank or _is_rank_0():
        prefix = "" if _is_rank_0() or not every_rank else f"[rank {os.environ.get('RANK')}] "
        print(f"{prefix}pretrain_gpt.py: error: {message}", file=sys.stderr, flush=True)
        return EXIT_BAD_ARGS
    from megatron_terapipe.training.args import exit_quietly

    exit_quietly(EXIT_BAD_ARGS)


def parse_and_validate(argv: Sequence[str] | None = None):
    """(args, None) when the flags can train, else (None, message). Never imports torch."""
    from megatron_terapipe.training.args import (
        ArgumentValidationError,
        machine_errors,
        parse_args,
        validate_args,
    )

    args = parse_args(argv, quiet=not _is_rank_0())  # argparse errors: status 2, rank 0 prints
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = validate_args(args, world_size)
        errors = machine_errors(args)
        if errors:
            raise ArgumentValidationError(errors)
        return args, None
    except ArgumentValidationError as exc:
        return None, str(exc)


def _quiet_megatron_import_warnings() -> None:
    # megatron-core warns at import about every missing GPU-only extra (Apex, TE...).
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE|apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def pretrain(args, forward_step_func: Callable | None = None) -> int:
    """Train with validated `args`; returns the last iteration reached."""
    _quiet_megatron_import_warnings()
    start = time.time()
    import torch

    from megatron_terapipe import megatron_lm
    from megatron_terapipe.arguments import token_pipeline_warnings
    from megatron_terapipe.training import (
        checkpointing,
        data,
        initialize,
        loop,
        optim,
    )
    from megatron_terapipe.training import (
        model as model_module,
    )
    from megatron_terapipe.training.args import format_args

    if args.num_workers == 0:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from megatron_terapipe.training.data_checks import DataError, check_data

    problems, data_warnings = check_data(args)  # before any rank builds a dataset (or a group)
    if problems:
        raise DataError("invalid data:\n" + "\n".join(f"  - {p}" for p in problems))
    initialize.initialize_distributed(args)
    initialize.print_rank_0(format_args(args))
    for warning in [*data_warnings, *token_pipeline_warnings(args)]:
        initialize.print_rank_0(f"WARNING: {warning}")
    initialize.set_random_seed(args.seed)
    initialize.init_microbatches(args)
    try:
        try:
            forward_backward_func = megatron_lm.get_forward_backward_func(args)
        except ValueError as exc:
            flags = [f"--token-pipeline-slices {args.token_pipeline_slices}"]
            if args.token_pipeline_memory_cap is not None:
                flags.append(f"--token-pipeline-memory-cap {args.token_pipeline_memory_cap:g}")
            if args.token_pipeline_cost_model:
                flags.append(f"--token-pipeline-cost-model {args.token_pipeline_cost_model}")
            raise StartupConfigurationError(
                f"token pipeline set-up failed ({', '.join(flags)}): {exc}"
            ) from exc
        config = model_module.transformer_config_from_args(args)
        model = model_module.build_model(args, config)
        if getattr(args, "token_pipeline", False) and args.token_pipeline_split_backward:
            from megatron_terapipe.model.weight_grad_deferral import check_split_backward

            try:  # the executor's own check, now instead of at the first step
                check_split_backward(config, model)
            except ValueError as exc:
                raise StartupConfigurationError(str(exc)) from exc
        optimizer = optim.build_optimizer(args, model)
        scheduler = optim.build_scheduler(args, optimizer)

        iteration, flops_so_far = 0, 0.0
        args.consumed_valid_samples = 0
        if args.load is not None:
            iteration, flops_so_far = checkpointing.load_checkpoint(
                args, model, optimizer, scheduler
            )
        args.iteration = iteration
        datasets = data.build_datasets(args)
        train_iterator, valid_iterator = data.build_iterators(
            args, datasets, args.consumed_train_samples, args.consumed_valid_samples
        )
        initialize.print_rank_0(
            f"time to initialize (seconds): {time.time() - start:.3f}\n"
            f"> schedule: {_schedule_summary(args)}"
        )

        def save(it: int, flops: float) -> None:
            checkpointing.save_checkpoint(args, it, model, optimizer, scheduler, flops)

        last = loop.train(
            args,
            forward_step_func or data.forward_step,
            model,
            optimizer,
            scheduler,
            train_iterator,
            valid_iterator,
            forward_backward_func,
            iteration,
            flops_so_far,
            save if args.save else None,
        )
        initialize.print_rank_0(f"> training finished at iteration {last}")
        return last
    finally:
        megatron_lm.reset()
        initialize.shutdown()


def _schedule_summary(args) -> str:
    from megatron_terapipe.training.reporting import schedule_name

    name = schedule_name(args)
    if args.token_pipeline:
        slices = args.token_pipeline_plan.get("token_slices")
        return f"{name} (token slices {slices})"
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 2 for anything the user's flags, data or checkpoint must fix: one
    message (from rank 0) and no traceback."""
    from megatron_terapipe.training.checkpoint_checks import CheckpointError
    from megatron_terapipe.training.data_checks import DataError

    args, problem = parse_and_validate(argv)
    if problem is not None:
        return report_error(problem)
    try:
        pretrain(args)
    except (StartupConfigurationError, CheckpointError, DataError) as exc:
        return report_error(str(exc), every_rank=getattr(exc, "rank_local", False))
    return 0
