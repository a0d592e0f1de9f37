"""Hooks that Megatron-LM (patched with one of patches/megatron-lm-<tag>.patch) and our own
trainer call, so that `--token-pipeline` is honoured with almost no upstream change.

Upstream calls, in order:

1. `extra_args_provider(parser)` (or `combined_extra_args_provider(other)`) from
   `pretrain_gpt.py` (given to `pretrain()` in core_v0.16.1, to `parse_and_validate_args()` in
   core_v0.19.0): adds the ``--token-pipeline*`` group.
2. `validate_args(args)` at the end of Megatron-LM's `validate_args`: checks the flags against
   the rest of the configuration (CP, MoE, VP, batch, slices...) and fills defaults.
3. The layer spec: core_v0.16.1's `gpt_builders.py` builds a spec and passes it through
   `layer_spec(spec, args)`; core_v0.19.0's `pretrain_gpt.py` builds the model from a
   `GPTModelConfig`, which `gpt_model_config(model_config, args)` hands a spec callable
   resolving upstream's own choice and then swapping in prefix-KV attention.
4. `get_forward_backward_func(...)` imported by `megatron/training/training.py` in place of
   megatron-core's, called with whatever keywords that release passes: returns the
   token-pipeline executor when ``args.token_pipeline`` is set, megatron-core's (given the
   same keywords) otherwise. With ``--token-pipeline-slices auto`` its first call plans the
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
import inspect
from collections.abc import Callable
from typing import Any

from megatron_terapipe.arguments import (
    LOCAL_ATTENTION_BACKEND_ERROR,
    TokenPipelineArgumentError,
    add_token_pipeline_args,
    is_local_attention_backend,
    resolved_token_pipeline_args,
    token_pipeline_config_from_args,
    token_pipeline_errors,
)
from megatron_terapipe.flag_values import slice_multiple

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
    errors = token_pipeline_errors(args)
    if errors:
        raise TokenPipelineArgumentError(errors)
    resolved_token_pipeline_args(args)
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


def gpt_model_config(model_config: Any, args: Any = None) -> Any:
    """`model_config` (Megatron-LM's GPTModelConfig) building prefix-KV core attention under
    --token-pipeline; unchanged otherwise.

    Megatron-LM core_v0.19.0 builds GPT models from this config, not from a spec the entry
    script passes, so the swap goes into its `transformer_layer_spec`, which may be a callable
    of the config: ours resolves the spec exactly as upstream's builder would (its
    `default_layer_spec` when none was given, a `--spec` spec or callable otherwise) and then
    swaps core attention. Resolving it there, per model chunk, keeps upstream's per-stage
    choices (vp_stage) intact.
    """
    args = args if args is not None else _megatron_args()
    if args is None or not getattr(args, "token_pipeline", False):
        return model_config
    model_config.transformer_layer_spec = _token_pipeline_spec_provider(
        model_config.transformer_layer_spec, args
    )
    return model_config


def _token_pipeline_spec_provider(base: Any, args: Any) -> Callable:
    """A `transformer_layer_spec` callable: `base` resolved as Megatron-LM's GPTModelBuilder
    resolves it, with prefix-KV core attention."""

    def token_pipeline_layer_spec_provider(config, vp_stage=None):
        if is_local_attention_backend(getattr(config, "attention_backend", None)):
            # The builder would replace core attention after this spec is returned: the
            # slices would silently attend to themselves only.
            raise ValueError(LOCAL_ATTENTION_BACKEND_ERROR)
        if base is None:
            from megatron.training.models.gpt import default_layer_spec

            spec = default_layer_spec(config, vp_stage)
        elif callable(base) and not _is_spec(base):
            takes_vp = "vp_stage" in inspect.signature(base).parameters
            spec = base(config, vp_stage=vp_stage) if takes_vp else base(config)
        else:
            spec = base
        return layer_spec(spec, args)

    return token_pipeline_layer_spec_provider


def _is_spec(value: Any) -> bool:
    from megatron.core.transformer.spec_utils import ModuleSpec

    return isinstance(value, ModuleSpec) or hasattr(value, "layer_specs")


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
        slices = config.resolve_token_slices(args.seq_length, slice_multiple(args))
        args.token_pipeline_plan = {"token_slices": list(slices), "strategy": "fixed"}
        print_fn(
            f"> token pipeline: schedule {config.schedule}, token slices {list(slices)} "
            f"(from --token-pipeline-slices {_slices_text(args.token_pipeline_slices)})"
            + (", split backward (B/W)" if config.split_backward else "")
        )
    return config


def get_forward_backward_func(args: Any = None, **stock_kwargs: Any) -> Callable:
    """The forward-backward function `args` ask for: ours under --token-pipeline, else
    megatron-core's `get_forward_backward_func(**stock_kwargs)` result.

    Called without `args` (as Megatron-LM's training loop calls megatron-core's), it reads
    Megatron-LM's global args. The keywords are megatron-core's own (`pp_size`, `vp_size`;
    from 0.17 on also `schedule_pg_collection`) and go to it unchanged, so each Megatron-LM
    release can call this exactly as it calls its megatron-core's. The token-pipeline function
    is built once per configuration.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func as stock

    args = args if args is not None else _megatron_args()
    if args is None or not getattr(args, "token_pipeline", False):
        return stock(**stock_kwargs)
    _check_schedule_process_groups(stock_kwargs.get("schedule_pg_collection"))
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


def _check_schedule_process_groups(pg_collection: Any) -> None:
    """Refuse multi-module pipelines by name: megatron-core runs a
    MultiModuleProcessGroupCollection (several models, e.g. an encoder feeding a language
    model, on their own rank grids) on its own schedule; token slices of one model's sequence
    cannot be cut across them. megatron-core releases without the class have no such pipelines.
    """
    if pg_collection is None:
        return
    try:
        from megatron.core.process_groups_config import MultiModuleProcessGroupCollection
    except ImportError:
        return
    if isinstance(pg_collection, MultiModuleProcessGroupCollection):
        raise ValueError(
            "--token-pipeline does not support multi-module pipelines (a "
            "MultiModuleProcessGroupCollection as schedule_pg_collection); drop --token-pipeline "
            "to use megatron-core's schedule"
        )


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
    "gpt_model_config",
    "setup_token_pipeline",
    "get_forward_backward_func",
    "wrap_forward_step",
    "reset",
]
