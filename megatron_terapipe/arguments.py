"""The --token-pipeline* flags: add them to a Megatron parser, check them, build the config.

Both entry points use this module: our `scripts/pretrain_gpt.py` and an upstream Megatron-LM
checkout patched with its tag's `patches/megatron-lm-<tag>.patch` (through `megatron_lm.py`).
Everything here is plain Python (no torch, no megatron-core), so a bad flag set is rejected in
well under a second, before any rank starts a process group or builds a model.

Flag semantics (Megatron-LM naming style):

- ``--token-pipeline`` / ``--no-token-pipeline``: run the token-level pipeline (default off).
- ``--token-pipeline-schedule {terapipe,token-1f1b,token-interleaved}``.
- ``--token-pipeline-slices {N|auto|l1,l2,...}``: N equal slices, the DP planner (``auto``,
  the default), or explicit lengths that sum to ``--seq-length``.
- ``--token-pipeline-granularity G``: slices are multiples of G tokens (planner unit).
- ``--token-pipeline-cost-model {profile|analytic|analytic:<preset>|PATH}``: the planner's
  cost model (default profile: measured at start-up); PATH is a ``.json`` profile or a ``.npz``
  latency table.
- ``--token-pipeline-memory-cap GIB``: activation memory per stage the plan must fit in.
- ``--token-pipeline-split-backward``: split each backward that sends a gradient into its input
  gradient (sent at once) and its weight-gradient GEMMs (run right after), zero-bubble style.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from megatron_terapipe.config import TOKEN_SCHEDULES, TokenPipelineConfig
from megatron_terapipe.flag_values import (
    DEFAULT_COST_MODEL,
    cost_model_problem,
    num_microbatches,
    slice_multiple,
)
from megatron_terapipe.token_slices import granularity_problem, parse_token_slices
from megatron_terapipe.unsupported_features import SPLIT_BACKWARD_LIMITS
from megatron_terapipe.unsupported_features import args_errors as unsupported_args_errors

GROUP_TITLE = "token pipeline (TeraPipe)"
DEFAULT_SCHEDULE = "terapipe"
DEFAULT_SLICES = "auto"

# Flags whose value only matters with --token-pipeline; giving one without it is a mistake.
_DEPENDENT_FLAGS = {
    "token_pipeline_schedule": "--token-pipeline-schedule",
    "token_pipeline_slices": "--token-pipeline-slices",
    "token_pipeline_granularity": "--token-pipeline-granularity",
    "token_pipeline_cost_model": "--token-pipeline-cost-model",
    "token_pipeline_memory_cap": "--token-pipeline-memory-cap",
    "token_pipeline_split_backward": "--token-pipeline-split-backward",
}


class TokenPipelineArgumentError(ValueError):
    """One or more bad token-pipeline flags; the message names every flag and what is valid."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__(
            "invalid token-pipeline flags:\n" + "\n".join(f"  - {e}" for e in self.errors)
        )


def parse_slices(text: Any) -> str | int | tuple[int, ...]:
    """The value of --token-pipeline-slices: 'auto', a count N, or a tuple of lengths.

    Used as the argparse `type`, so a malformed value is an argparse error naming the flag;
    the grammar is `token_slices.parse_token_slices`, which the planner reads values with too.
    """
    try:
        return parse_token_slices(text, flag=None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_token_pipeline_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron `extra_args_provider`: add the token-pipeline group to `parser`, return it.

    Dependent flags default to None so validation can tell "not given" from a default and
    reject them without --token-pipeline; `resolved_token_pipeline_args` fills the defaults.
    """
    group = parser.add_argument_group(title=GROUP_TITLE)
    group.add_argument(
        "--token-pipeline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Run TeraPipe token-level pipeline parallelism: cut each micro-batch's sequence "
        "into token slices that flow through the pipeline stages back to back.",
    )
    group.add_argument(
        "--token-pipeline-schedule",
        choices=TOKEN_SCHEDULES,
        default=None,
        help=f"Token schedule (default {DEFAULT_SCHEDULE}). token-interleaved needs virtual "
        "pipeline stages; token-1f1b bounds in-flight slices like Seq1F1B.",
    )
    group.add_argument(
        "--token-pipeline-slices",
        type=parse_slices,
        default=None,
        metavar="{N|auto|l1,l2,...}",
        help="N equal token slices, 'auto' (TeraPipe's DP planner, run once on rank 0 and "
        "broadcast; the default), or explicit lengths summing to --seq-length.",
    )
    group.add_argument(
        "--token-pipeline-granularity",
        type=int,
        default=None,
        metavar="G",
        help="Slices are multiples of G tokens (the planner's unit). Must divide --seq-length. "
        "Default: the smallest G giving at most 256 units.",
    )
    group.add_argument(
        "--token-pipeline-cost-model",
        default=None,
        metavar="{profile|analytic|analytic:<preset>|PATH}",
        help="Cost model of the planner: profile (default: time this stage's layers on this "
        "device at start-up, seconds; analytic under tensor parallelism), analytic "
        "(FLOP-based, data-sheet rates), or a .json profile / .npz latency table.",
    )
    group.add_argument(
        "--token-pipeline-memory-cap",
        type=float,
        default=None,
        metavar="GIB",
        help="Activation memory per pipeline stage (GiB) the planned slicing must fit in.",
    )
    group.add_argument(
        "--token-pipeline-split-backward",
        action="store_true",
        default=None,
        help="Split each backward that sends a gradient to the previous stage: the input "
        "gradient first, sent at once, then the layer's weight-gradient GEMMs (zero-bubble "
        "style B/W split). Exact; needs gradient-accumulation fusion, no --sequence-parallel, "
        "the local transformer implementation.",
    )
    return parser


def resolved_token_pipeline_args(args: Any) -> Any:
    """Fill the token-pipeline defaults in place (after validation) and return `args`."""
    args.token_pipeline = bool(getattr(args, "token_pipeline", False))
    if getattr(args, "token_pipeline_schedule", None) is None:
        args.token_pipeline_schedule = DEFAULT_SCHEDULE
    if getattr(args, "token_pipeline_slices", None) is None:
        args.token_pipeline_slices = DEFAULT_SLICES
    if getattr(args, "token_pipeline_cost_model", None) is None:
        args.token_pipeline_cost_model = DEFAULT_COST_MODEL
    for name in ("token_pipeline_granularity", "token_pipeline_memory_cap"):
        if not hasattr(args, name):
            setattr(args, name, None)
    args.token_pipeline_split_backward = bool(getattr(args, "token_pipeline_split_backward", False))
    return args


def _get(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def virtual_pipeline_size(args: Any) -> int:
    """Virtual stages per pipeline rank implied by Megatron's VP flags (1 = none)."""
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vp:
        return int(vp)
    per_rank = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    if per_rank:
        return int(per_rank)
    layers_per_vp = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    pp = int(_get(args, "pipeline_model_parallel_size", 1))
    num_layers = getattr(args, "num_layers", None)
    if layers_per_vp and num_layers and num_layers % pp == 0:
        per_stage = num_layers // pp
        if layers_per_vp > 0 and per_stage % layers_per_vp == 0:
            return per_stage // layers_per_vp
    return 1


def layout_errors(args: Any) -> list[str]:
    """Megatron layout rules every pipelined run needs, token pipeline or not: virtual stages
    need two or more pipeline stages and a micro-batch count divisible by them, sequence
    parallelism a sequence divisible by the tensor-parallel size.

    The one check of these rules: `token_pipeline_errors` includes it (upstream Megatron-LM's
    hook path has no check of its own for some), and our trainer calls it for every run and
    tells `token_pipeline_errors` not to repeat it.
    """
    errors = []
    pp = int(_get(args, "pipeline_model_parallel_size", 1))
    vp = virtual_pipeline_size(args)
    if vp > 1 and pp < 2:
        errors.append(
            f"virtual pipeline stages ({vp} per rank: --num-layers-per-virtual-pipeline-stage "
            f"or --num-virtual-stages-per-pipeline-rank) need --pipeline-model-parallel-size "
            f">= 2, got {pp}"
        )
    micro = num_microbatches(args)
    if vp > 1 and pp > 1 and micro is not None and micro % pp:
        errors.append(
            f"virtual pipeline stages need the number of micro-batches per step "
            f"(--global-batch-size / (--micro-batch-size x data-parallel size) = {micro}) "
            f"divisible by --pipeline-model-parallel-size={pp}"
        )
    seq = getattr(args, "seq_length", None)
    multiple_of = slice_multiple(args)
    if seq is not None and seq % multiple_of:
        errors.append(
            f"--sequence-parallel needs --seq-length={seq} divisible by "
            f"--tensor-model-parallel-size={multiple_of}"
        )
    return errors


def token_pipeline_errors(args: Any, *, include_layout: bool = True) -> list[str]:
    """Every problem with the token-pipeline flags of `args` (a Megatron namespace).

    Reads Megatron-LM attribute names with getattr, so it works on Megatron-LM's own namespace
    and on ours. Checks are those that need no process group. `include_layout=False`: the
    caller has run `layout_errors` itself (our trainer, for every run), so they are not
    reported twice.
    """
    errors: list[str] = []
    enabled = getattr(args, "token_pipeline", None)
    if not enabled:
        if enabled is None:
            given = [flag for name, flag in _DEPENDENT_FLAGS.items() if getattr(args, name, None)]
            if given:
                errors.append(
                    f"{', '.join(given)} given without --token-pipeline; add --token-pipeline "
                    "or drop them"
                )
        return errors

    seq = getattr(args, "seq_length", None)
    tp = int(_get(args, "tensor_model_parallel_size", 1))
    multiple_of = slice_multiple(args)
    vp = virtual_pipeline_size(args)
    schedule = getattr(args, "token_pipeline_schedule", None) or DEFAULT_SCHEDULE

    # Features token slicing cannot run exactly (one table with check_token_pipeline_support).
    errors.extend(unsupported_args_errors(args))
    layout = layout_errors(args)
    if include_layout:
        errors.extend(layout)
    if is_local_attention_backend(getattr(args, "attention_backend", None)):
        errors.append(LOCAL_ATTENTION_BACKEND_ERROR)

    # Schedule vs virtual pipeline stages.
    if schedule == "token-1f1b" and vp > 1:
        errors.append(
            f"--token-pipeline-schedule=token-1f1b runs one model chunk per rank, but virtual "
            f"pipeline stages are on ({vp} per rank); use --token-pipeline-schedule "
            "token-interleaved or terapipe, or drop --num-layers-per-virtual-pipeline-stage"
        )
    if schedule == "token-interleaved" and vp < 2:
        errors.append(
            "--token-pipeline-schedule=token-interleaved needs virtual pipeline stages; set "
            "--num-layers-per-virtual-pipeline-stage (or --num-virtual-stages-per-pipeline-rank)"
        )

    # Slices.
    slices = getattr(args, "token_pipeline_slices", None)
    if isinstance(slices, (str, list)):
        try:
            slices = parse_token_slices(slices)
        except ValueError as exc:
            errors.append(str(exc))
            slices = None
    if seq is None:
        errors.append("--token-pipeline needs --seq-length")
    elif isinstance(slices, int):
        if slices < 1:
            errors.append(f"--token-pipeline-slices={slices}: the number of slices must be >= 1")
        elif seq % multiple_of:
            pass  # layout_errors names it
        elif slices > seq // multiple_of:
            errors.append(
                f"--token-pipeline-slices={slices} is more slices than --seq-length={seq} "
                f"allows (at most {seq // multiple_of} slices of at least {multiple_of} token(s))"
            )
    elif isinstance(slices, tuple):
        bad = [length for length in slices if length < 1]
        if bad:
            errors.append(
                f"--token-pipeline-slices={','.join(map(str, slices))}: every slice must be "
                f">= 1 token, got {bad}"
            )
        elif sum(slices) != seq:
            errors.append(
                f"--token-pipeline-slices={','.join(map(str, slices))} sums to {sum(slices)}, "
                f"but the slices must sum to --seq-length={seq}"
            )
        if multiple_of > 1 and any(length % multiple_of for length in slices):
            errors.append(
                f"--token-pipeline-slices={','.join(map(str, slices))}: under "
                f"--sequence-parallel every slice must be a multiple of "
                f"--tensor-model-parallel-size={tp}"
            )

    granularity = getattr(args, "token_pipeline_granularity", None)
    if granularity is not None and seq is not None:
        problem = granularity_problem(
            granularity, seq, multiple_of, flag="--token-pipeline-granularity",
            seq_flag="--seq-length", multiple_flag="--tensor-model-parallel-size",
        )
        if problem is not None:
            errors.append(problem)
        elif isinstance(slices, tuple) and any(length % granularity for length in slices):
            errors.append(
                f"--token-pipeline-slices={','.join(map(str, slices))}: every slice must be a "
                f"multiple of --token-pipeline-granularity={granularity}"
            )

    errors.extend(_split_backward_errors(args))
    problem = cost_model_problem(getattr(args, "token_pipeline_cost_model", None))
    if problem is not None:
        errors.append(problem)
    cap = getattr(args, "token_pipeline_memory_cap", None)
    if cap is not None and not cap > 0:
        errors.append(f"--token-pipeline-memory-cap={cap} must be > 0 (GiB)")
    elif cap is not None and not errors and not layout:
        from megatron_terapipe.slicing.memory import memory_model_problem

        problem = memory_model_problem(args)
        if problem is not None:
            errors.append(f"--token-pipeline-memory-cap cannot be checked: {problem}")
        elif isinstance(slices, (int, tuple)):
            errors.extend(_explicit_slices_memory_errors(args, slices, cap, multiple_of,
                                                         schedule))
    return errors


def _explicit_slices_memory_errors(
    args: Any, slices: int | tuple[int, ...], cap: float, multiple_of: int, schedule: str
) -> list[str]:
    """Explicit slices under --token-pipeline-memory-cap: the planner's memory model checks
    them as it checks its own plans (`auto`)."""
    from megatron_terapipe.slicing.memory import GIB, ActivationMemoryModel
    from megatron_terapipe.token_slices import equal_token_slices

    seq = int(args.seq_length)
    lengths = equal_token_slices(seq, slices, multiple_of) if isinstance(slices, int) else slices
    micro = num_microbatches(args) or 1
    mbs = int(_get(args, "micro_batch_size", 1))
    stages = int(_get(args, "pipeline_model_parallel_size", 1))
    if getattr(args, "num_layers", None) is None or getattr(args, "hidden_size", None) is None:
        return []
    peak = ActivationMemoryModel.from_args(args).peak_bytes(
        schedule, (mbs,) * micro, (tuple(lengths),) * micro, stages,
        split_backward=bool(_get(args, "token_pipeline_split_backward", False)),
    )
    if peak <= cap * GIB:
        return []
    shown = slices if isinstance(slices, int) else ",".join(map(str, slices))
    return [
        f"--token-pipeline-slices={shown} needs {peak / GIB:.3f} GiB of activations per stage "
        f"(the planner's memory model), over --token-pipeline-memory-cap={cap:g}; choose "
        "other slices (under terapipe a thin last slice costs the most), or "
        "--token-pipeline-slices auto to plan within the cap"
    ]


def token_pipeline_warnings(args: Any) -> list[str]:
    """Allowed but probably not meant: one line each, printed once at start-up."""
    pp = int(_get(args, "pipeline_model_parallel_size", 1))
    warnings = []
    if getattr(args, "token_pipeline", False) and pp == 1:
        warnings.append(
            "--token-pipeline with --pipeline-model-parallel-size 1: without a pipeline there "
            "is no bubble to shrink, so token slicing only adds overhead (useful for checks)"
        )
        if getattr(args, "token_pipeline_split_backward", False):
            warnings.append(
                "--token-pipeline-split-backward with --pipeline-model-parallel-size 1: no "
                "backward sends a gradient, so none is split"
            )
    return warnings


def _split_backward_errors(args: Any) -> list[str]:
    """Setups in which megatron-core's linear layers cannot hand their weight gradients to a
    later W action, by flag; the model check (`model.weight_grad_deferral`) gives the same
    reasons (`unsupported_features.SPLIT_BACKWARD_LIMITS`) for what only a built model shows."""
    if not getattr(args, "token_pipeline_split_backward", False):
        return []
    flag = "--token-pipeline-split-backward"
    why = SPLIT_BACKWARD_LIMITS
    errors = []
    if getattr(args, "gradient_accumulation_fusion", True) is False:
        errors.append(
            f"{flag} needs gradient-accumulation fusion; drop --no-gradient-accumulation-fusion "
            f"({why['gradient_accumulation_fusion']})"
        )
    if getattr(args, "sequence_parallel", False):
        errors.append(
            f"{flag} does not support --sequence-parallel ({why['sequence_parallel']})"
        )
    if getattr(args, "use_megatron_fsdp", False):
        errors.append(f"{flag} does not support --use-megatron-fsdp ({why['megatron_fsdp']})")
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        errors.append(
            f"{flag} needs --transformer-impl local ({why['transformer_engine']})"
        )
    return errors


# Megatron-LM parses --attention-backend into megatron-core's AttnBackend enum; our trainer
# keeps the string. The upstream hook's spec provider raises this too, for a config switched
# to the local backend after the argument check.
LOCAL_ATTENTION_BACKEND_ERROR = (
    "--attention-backend local with --token-pipeline: it selects megatron-core's "
    "DotProductAttention as core attention, which cannot attend to the keys/values of earlier "
    "token slices; use --attention-backend auto (prefix-KV attention), or drop --token-pipeline"
)


def is_local_attention_backend(value: Any) -> bool:
    """Whether an --attention-backend value (a string or megatron-core's AttnBackend) is the
    local backend; both spell it "local"."""
    return getattr(value, "name", value) == "local"


def validate_token_pipeline_args(args: Any) -> Any:
    """Raise TokenPipelineArgumentError listing every bad flag; fill defaults and return args."""
    errors = token_pipeline_errors(args)
    if errors:
        raise TokenPipelineArgumentError(errors)
    return resolved_token_pipeline_args(args)


def token_pipeline_config_from_args(args: Any, plan: Any = None) -> TokenPipelineConfig:
    """The TokenPipelineConfig that `args` (validated) and an optional planner result ask for.

    With `--token-pipeline-slices auto` a plan is required: planning may profile the device,
    so it runs once at start-up (see `megatron_lm.setup_token_pipeline`), not here.
    """
    schedule = getattr(args, "token_pipeline_schedule", None) or DEFAULT_SCHEDULE
    common = {
        "schedule": schedule,
        "split_backward": bool(getattr(args, "token_pipeline_split_backward", False)),
    }
    if plan is not None:
        return TokenPipelineConfig(plan=plan, **common)
    slices = getattr(args, "token_pipeline_slices", None)
    if isinstance(slices, (str, list)):
        slices = parse_token_slices(slices)
    if isinstance(slices, int):
        return TokenPipelineConfig(num_token_slices=slices, **common)
    if isinstance(slices, tuple):
        return TokenPipelineConfig(token_slices=slices, **common)
    raise ValueError(
        "--token-pipeline-slices auto needs the planner's result; call "
        "megatron_terapipe.megatron_lm.setup_token_pipeline(args) first"
    )


__all__ = [
    "add_token_pipeline_args",
    "validate_token_pipeline_args",
    "token_pipeline_errors",
    "token_pipeline_warnings",
    "token_pipeline_config_from_args",
    "resolved_token_pipeline_args",
    "TokenPipelineArgumentError",
    "parse_slices",
    "layout_errors",
    "is_local_attention_backend",
    "LOCAL_ATTENTION_BACKEND_ERROR",
    "DEFAULT_COST_MODEL",
]
