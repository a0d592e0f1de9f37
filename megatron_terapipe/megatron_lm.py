"""Hooks that Megatron-LM (patched with patches/megatron-lm-core_v0.16.1.patch) and our own
trainer call, so that `--token-pipeline` is honoured with almost no upstream change.

Upstream calls, in order:

1. `extra_args_provider(parser)` (or `combined_extra_args_provider(other)`) from
   `pretrain_gpt.py`: adds the ``--token-pipeline*`` group.
2. `validate_args(args)` at the end of Megatron-LM's `validate_args`: checks the flags against
   the rest of the configuration (CP, MoE, VP, batch, slices...) and fills defaults.
3. `layer_spec(spec, args)` in `gpt_builders.py`: swaps core attention for prefix-KV attention.
4. `get_forward_backward_func()` imported by `megatron/training/training.py` in place of
   megatron-core's: returns the token-pipeline executor when ``args.token_pipeline`` is set,
   megatron-core's otherwise. With ``--token-pipeline-slices auto`` its first call plans the
   slicing on rank 0 and broadcasts it (every rank calls it at the same point of `train()`).
5. `wrap_forward_step(forward_step)` in `pretrain_gpt.py`: while a token slice runs, Megatron-LM's
   batch helpers see ``args.seq_length`` = the slice's length (they size TP-broadcast buffers
   from it).

Nothing here imports megatron.training at module level: training.py imports this module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from typing import Any

from megatron_terapipe.arguments import (
    TokenPipelineArgumentError,
    add_token_pipeline_args,
    token_pipeline_config_from_args,
    validate_token_pipeline_args,
)

_CACHE: dict[str, Any] = {"key": None, "func": None}


def _megatron_args() -> Any:
    """Megatron-LM's global args, or None outside Megatron-LM (or before they are set)."""
    try:
        from megatron.training.global_vars import get_args
    except ImportError:
        return None
    try:
        return get_args()
    except (AssertionError, AttributeError):
        return None


def _print_rank_0(message: str) -> None:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


# -- 1. arguments ----------------------------------------------------------------------------
def extra_args_provider(parser):
    """Megatron-LM `extra_args_provider`: the ``--token-pipeline*`` argument group."""
    return add_token_pipeline_args(parser)


def combined_extra_args_provider(other: Callable | None = None) -> Callable:
    """An extra_args_provider adding ours and then `other`'s (e.g. ModelOpt's) arguments."""

    def provider(parser):
        parser = add_token_pipeline_args(parser)
        return other(parser) if other is not None else parser

    return provider


# -- 2. validation ---------------------------------------------------------------------------
def validate_args(args: Any) -> Any:
    """Check the token-pipeline flags after Megatron-LM's own checks; fill their defaults.

    Raises TokenPipelineArgumentError (a ValueError) listing every bad flag, on every rank,
    before any model or data is built.
    """
    if not hasattr(args, "token_pipeline"):
        return args  # a script that did not add our flags (pretrain_bert.py, ...)
    validate_token_pipeline_args(args)
    if args.token_pipeline:
        _dataloader_masks(args)
        if getattr(args, "rank", 0) == 0:
            print(
                f"> token pipeline: schedule {args.token_pipeline_schedule}, slices "
                f"{_slices_text(args.token_pipeline_slices)}",
                flush=True,
            )
    return args


def _dataloader_masks(args: Any) -> None:
    """Keep the dataloader's [b, 1, s, s] masks only when they carry documents.

    A plain causal mask is what prefix-KV attention builds per slice anyway, so it is not
    made, sliced and TP-broadcast for nothing. A --reset-attention-mask document mask is
    kept: the executor hands each slice its query rows and the key columns [0, offset + l),
    which prefix-KV attention applies on top of causality, exactly as stock attention does.
    Upstream's TP broadcast (get_batch_on_this_tp_rank) sizes the receiving ranks' mask
    buffer [s, s] from --seq-length, while a slice's mask is [l, offset + l]: TP > 1 would
    receive the wrong shape, so that combination is refused by name.
    """
    if not getattr(args, "create_attention_mask_in_dataloader", False):
        return
    if not getattr(args, "reset_attention_mask", False):
        args.create_attention_mask_in_dataloader = False
        return
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    if tp > 1:
        raise TokenPipelineArgumentError(
            [
                f"--reset-attention-mask with --tensor-model-parallel-size={tp}: Megatron-LM "
                "broadcasts [s, s] document masks over tensor-parallel ranks, but a token "
                "slice's mask is [slice, prefix + slice]; use --tensor-model-parallel-size 1, "
                "or drop --reset-attention-mask (or --token-pipeline)"
            ]
        )


def _slices_text(slices: Any) -> str:
    if isinstance(slices, tuple):
        return ",".join(map(str, slices))
    return str(slices)


# -- 3. layer spec ---------------------------------------------------------------------------
def layer_spec(spec: Any, args: Any = None) -> Any:
    """`spec` with prefix-KV core attention under --token-pipeline, `spec` itself otherwise."""
    args = args if args is not None else _megatron_args()
    if args is None or not getattr(args, "token_pipeline", False):
        return spec
    from megatron_terapipe.model import token_pipeline_layer_spec

    if hasattr(spec, "layer_specs"):  # a TransformerBlockSubmodules (block spec)
        block = copy.copy(spec)
        block.layer_specs = [token_pipeline_layer_spec(s) for s in spec.layer_specs]
        return block
    return token_pipeline_layer_spec(spec)


# -- 4. schedule -----------------------------------------------------------------------------
def setup_token_pipeline(args: Any, print_fn: Callable[[str], None] | None = None):
    """The TokenPipelineConfig for `args`, planning the slices first under ``auto``.

    Collective under torch.distributed: rank 0 plans (the planner may profile the device) and
    broadcasts, so every rank must call it. The plan is printed in Megatron's argument style
    and kept on `args.token_pipeline_plan` (a dict, for logs and checkpoints).
    """
    print_fn = print_fn or _print_rank_0
    plan = None
    if getattr(args, "token_pipeline_slices", "auto") == "auto":
        from megatron_terapipe.slicing import plan_and_broadcast

        plan = plan_and_broadcast(args, print_fn=print_fn)
        args.token_pipeline_plan = plan.to_dict()
    config = token_pipeline_config_from_args(args, plan=plan)
    if plan is None:
        multiple_of = (
            args.tensor_model_parallel_size if getattr(args, "sequence_parallel", False) else 1
        )
        slices = config.resolve_token_slices(args.seq_length, multiple_of)
        args.token_pipeline_plan = {"token_slices": list(slices), "strategy": "fixed"}
        print_fn(
            f"> token pipeline: schedule {config.schedule}, token slices {list(slices)} "
            f"(from --token-pipeline-slices {_slices_text(args.token_pipeline_slices)})"
            + (", split backward (B/W)" if config.split_backward else "")
        )
    return config


def get_forward_backward_func(
    args: Any = None, *, pp_size: int | None = None, vp_size: int | None = None
) -> Callable:
    """The forward-backward function `args` ask for: ours under --token-pipeline, else
    megatron-core's `get_forward_backward_func()` result.

    Called with no argument (as Megatron-LM's training loop calls megatron-core's), it reads
    Megatron-LM's global args; `pp_size` / `vp_size` pass through to megatron-core's. The
    token-pipeline function is built once per configuration.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func as stock

    args = args if args is not None else _megatron_args()
    if args is None or not getattr(args, "token_pipeline", False):
        return stock(pp_size=pp_size, vp_size=vp_size)
    key = (
        id(args),
        args.token_pipeline_schedule,
        str(args.token_pipeline_slices),
        args.seq_length,
    )
    if _CACHE["key"] != key:
        from megatron_terapipe.schedules.executor import get_forward_backward_func as ours

        _CACHE["func"] = ours(setup_token_pipeline(args))
        _CACHE["key"] = key
    return _CACHE["func"]


def reset() -> None:
    """Forget the cached forward-backward function (tests; a second run in one process)."""
    _CACHE.update(key=None, func=None)


# -- 5. forward step ---------------------------------------------------------------------------
@contextlib.contextmanager
def _slice_seq_length(args: Any):
    from megatron_terapipe.model import get_slice_context

    context = get_slice_context()
    unit = context.current if context is not None else None
    if args is None or unit is None:
        yield
        return
    full = args.seq_length
    args.seq_length = unit.length
    try:
        yield
    finally:
        args.seq_length = full


def wrap_forward_step(forward_step_func: Callable, args: Any = None) -> Callable:
    """`forward_step_func`, seeing the current token slice's length as ``args.seq_length``
    (outside a token-pipeline step: unchanged)."""

    @functools.wraps(forward_step_func)
    def forward_step(data_iterator, model, *f_args, **f_kwargs):
        current = args if args is not None else _megatron_args()
        with _slice_seq_length(current):
            return forward_step_func(data_iterator, model, *f_args, **f_kwargs)

    return forward_step


__all__ = [
    "extra_args_provider",
    "combined_extra_args_provider",
    "validate_args",
    "layer_spec",
    "setup_token_pipeline",
    "get_forward_backward_func",
    "wrap_forward_step",
    "reset",
]
