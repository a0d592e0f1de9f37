"""Flags of scripts/pretrain_gpt.py: Megatron-LM's names for what this trainer supports.

Parsing and validation are plain Python: every bad flag set is rejected here, with a message
naming the flags and what would be valid, before a process group, a model or a dataset
exists. Unknown flags are argparse errors (`allow_abbrev=False`, like Megatron-LM), so a
Megatron-LM flag this trainer does not implement fails loudly instead of being ignored.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import NoReturn

from megatron_terapipe.arguments import (
    add_token_pipeline_args,
    layout_errors,
    resolved_token_pipeline_args,
    token_pipeline_errors,
    virtual_pipeline_size,
)
from megatron_terapipe.training import checkpoint_files
from megatron_terapipe.training.config_files import CONFIG_FLAG, expand_config_args

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
# Megatron-LM's choices, so its configs parse; only NullTokenizer is implemented here.
TOKENIZER_TYPES = (
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "TikTokenizer",
    "MultimodalTokenizer",
    "NullTokenizer",
    "NullMultimodalTokenizer",
    "SFTTokenizer",
)


class ArgumentValidationError(ValueError):
    """A flag set that cannot train; the message lists every problem, one per line."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid arguments:\n" + "\n".join(f"  - {e}" for e in self.errors))


def build_parser() -> argparse.ArgumentParser:
    """The parser: Megatron-LM flag names and defaults, plus the token-pipeline group."""
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="GPT pre-training on megatron-core with optional TeraPipe token pipeline. "
        "Flags follow Megatron-LM's names; unknown flags are errors.",
        allow_abbrev=False,
    )
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE",
        help="Read flags from FILE (configs/*.args); expanded in place, later flags override.",
    )

    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default 4 x hidden size.")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument(
        "--position-embedding-type",
        default="learned_absolute",
        choices=["learned_absolute", "rope", "mrope", "relative", "none"],
    )
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument(
        "--transformer-impl",
        default=None,
        choices=["local", "transformer_engine"],
        help="Layer implementation. Default: transformer_engine when Transformer Engine is "
        "importable and a GPU is present, else local.",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "local", "flash"],
        help="Core attention of the local layers: local (megatron-core DotProductAttention), "
        "flash (torch SDPA, the kernel the token pipeline runs), auto (local; SDPA under "
        "--token-pipeline).",
    )
    # Accepted so that Megatron-LM command lines carrying it fail with a clear message.
    g.add_argument("--mtp-num-layers", type=int, default=None)

    # MoE, with Megatron-LM's names and defaults (megatron-core's MoE layer spec).
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-score-function", default="softmax",
                   choices=["softmax", "sigmoid"])
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", default="allgather",
                   choices=["allgather", "alltoall", "flex"])
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument(
        "--overlap-grad-reduce",
        action="store_true",
        help="Reduce data-parallel gradients in buckets during the backward (megatron-core DDP).",
    )
    g.add_argument(
        "--no-align-grad-reduce",
        dest="align_grad_reduce",
        action="store_false",
        help="With --overlap-grad-reduce: let each chunk start its reduction on its own instead "
        "of after the chunk's last backward of the step.",
    )
    g.add_argument(
        "--distributed-backend",
        default=None,
        choices=["nccl", "gloo"],
        help="Default: nccl with CUDA, gloo without. gloo runs on the CPU even where GPUs exist.",
    )
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false",
                   dest="gradient_accumulation_fusion",
                   help="Compute each weight gradient into .grad and let DDP add it to main_grad "
                   "instead of accumulating into main_grad in the GEMM (apex's "
                   "fused_weight_gradient_mlp_cuda; on CPU its addmm_ equivalent). Without "
                   "that extension on a GPU the unfused path is used anyway.")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)

    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument(
        "--lr-wsd-decay-style",
        default="exponential",
        choices=["exponential", "linear", "cosine", "minus_sqrt"],
    )
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument(
        "--override-opt_param-scheduler",
        action="store_true",
        help="On resume, take the learning-rate and weight-decay schedule from these flags "
        "instead of the checkpoint (Megatron-LM's meaning).",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        help="On resume, keep the checkpoint's learning-rate and weight-decay schedule and "
        "ignore differing flags (Megatron-LM's meaning). Without either flag a difference is "
        "an error.",
    )

    g = parser.add_argument_group("data")
    g.add_argument("--mock-data", action=_MockDataAction, nargs=0, default=False)
    g.add_argument(
        "--data-path", nargs="*", default=None, action=_DataPathAction,
        help="PREFIX or WEIGHT PREFIX pairs; turns off a --mock-data given before it.",
    )
    g.add_argument("--split", default=None, help="Default 969,30,1 (Megatron-LM's).")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--ckpt-step", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"])

    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2])

    add_token_pipeline_args(parser)
    _add_negations(parser)
    return parser


class _MockDataAction(argparse.Action):
    """--mock-data: a later --mock-data replaces an earlier --data-path (later flags win)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.mock_data = True
        namespace.data_path = None


class _DataPathAction(argparse.Action):
    """--data-path: real data, so an earlier --mock-data (say, from a config file) is off."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.data_path = values
        namespace.mock_data = False


def _add_negations(parser: argparse.ArgumentParser) -> None:
    """A ``--no-X`` for every on/off flag ``--X``, so a later flag can turn off one that a
    ``--config`` file turned on (``--no-mock-data``, ``--no-bf16``, ...)."""
    taken = {opt for action in parser._actions for opt in action.option_strings}
    for action in list(parser._actions):
        is_switch = isinstance(action, (argparse._StoreTrueAction, _MockDataAction))
        if not is_switch or not action.option_strings:
            continue
        flag = action.option_strings[0]
        negation = "--no-" + flag[2:]
        if flag.startswith("--no-") or negation in taken:
            continue
        group = getattr(action, "container", parser)  # next to the flag in --help
        group.add_argument(
            negation, dest=action.dest, action="store_false",
            help=f"Turn off {flag} (e.g. one set by a --config file).",
        )


# How long a rank that leaves the error message to rank 0 waits before exiting: torchrun stops
# every other rank as soon as one exits, and rank 0 must get to print first.
QUIET_EXIT_GRACE_S = 5.0


def exit_quietly(status: int = 2) -> NoReturn:
    """Exit without a message, after rank 0 has had the time to print it (see above)."""
    import sys
    import time

    time.sleep(QUIET_EXIT_GRACE_S)
    sys.exit(status)


def parse_args(argv: Sequence[str] | None = None, quiet: bool = False) -> argparse.Namespace:
    """Parse (with --config files expanded); argparse exits with status 2 on unknown flags.

    `quiet`: exit with status 2 without printing (ranks other than 0 under torchrun)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if quiet:
        parser.error = lambda message: exit_quietly(2)  # type: ignore[method-assign]
    try:
        expanded = expand_config_args(argv)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(expanded)
    args.config = None
    return args


def machine_errors(args: argparse.Namespace) -> list[str]:
    """What this machine cannot run, for validated `args` (configs stay valid anywhere else)."""
    on_gpu = args.distributed_backend == "nccl" and _cuda_available()
    if args.fp16 and not on_gpu:
        return [
            "--fp16 needs a GPU: on the CPU the float16 model overflows in its first iteration "
            "(NaN grad norm); use --bf16 or full precision (no flag) for CPU runs"
        ]
    return []


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _tensorboard_importable() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _data_path_errors(paths: list[str]) -> list[str]:
    """Megatron-LM's --data-path forms: PREFIX, or WEIGHT PREFIX pairs."""
    if not paths:
        return ["--data-path needs at least one dataset prefix"]
    if len(paths) == 1:
        prefixes = paths
    else:
        if len(paths) % 2:
            return [f"--data-path takes one PREFIX or WEIGHT PREFIX pairs; got {len(paths)} values"]
        prefixes = paths[1::2]
        for weight in paths[0::2]:
            try:
                float(weight)
            except ValueError:
                return [f"--data-path weight {weight!r} is not a number (WEIGHT PREFIX pairs)"]
    errors = []
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            errors.append(
                f"--data-path {prefix}: missing {' and '.join(prefix + e for e in missing)} "
                "(a megatron-core indexed dataset prefix)"
            )
    return errors


def validation_errors(args: argparse.Namespace, world_size: int) -> list[str]:
    """Every reason `args` cannot train on `world_size` ranks (empty: it can)."""
    errors: list[str] = []
    required = {
        "--num-layers": args.num_layers,
        "--hidden-size": args.hidden_size,
        "--num-attention-heads": args.num_attention_heads,
        "--seq-length": args.seq_length,
        "--micro-batch-size": args.micro_batch_size,
        "--train-iters": args.train_iters,
        "--lr": args.lr,
    }
    missing = [flag for flag, value in required.items() if value is None]
    if missing:
        errors.append(f"missing required flags: {', '.join(missing)}")

    positive = {
        "--num-layers": args.num_layers,
        "--hidden-size": args.hidden_size,
        "--num-attention-heads": args.num_attention_heads,
        "--seq-length": args.seq_length,
        "--micro-batch-size": args.micro_batch_size,
        "--global-batch-size": args.global_batch_size,
        "--train-iters": args.train_iters,
        "--tensor-model-parallel-size": args.tensor_model_parallel_size,
        "--pipeline-model-parallel-size": args.pipeline_model_parallel_size,
        "--context-parallel-size": args.context_parallel_size,
        "--log-interval": args.log_interval,
        "--eval-interval": args.eval_interval,
        "--save-interval": args.save_interval,
        "--exit-interval": args.exit_interval,
        "--ffn-hidden-size": args.ffn_hidden_size,
        "--num-query-groups": args.num_query_groups,
        "--max-position-embeddings": args.max_position_embeddings,
        "--vocab-size": args.vocab_size,
        "--num-layers-per-virtual-pipeline-stage": args.num_layers_per_virtual_pipeline_stage,
        "--num-virtual-stages-per-pipeline-rank": args.num_virtual_stages_per_pipeline_rank,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            errors.append(f"{flag}={value} must be >= 1")
    if args.expert_model_parallel_size > 1 and args.num_experts is None:
        errors.append("--expert-model-parallel-size > 1 needs --num-experts")
    if args.eval_iters < 0:
        errors.append(f"--eval-iters={args.eval_iters} must be >= 0")
    if args.num_workers < 0:
        errors.append(f"--num-workers={args.num_workers} must be >= 0")
    if errors:
        return errors  # the arithmetic below needs sane values

    tp, pp, cp = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
    )
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size={tp} x "
            f"--pipeline-model-parallel-size={pp} x --context-parallel-size={cp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} ranks"
        )
        dp = None
    else:
        dp = world_size // model_parallel

    if args.num_layers % pp:
        errors.append(
            f"--num-layers={args.num_layers} is not divisible by "
            f"--pipeline-model-parallel-size={pp}"
        )
    if args.hidden_size % args.num_attention_heads:
        errors.append(
            f"--hidden-size={args.hidden_size} is not divisible by "
            f"--num-attention-heads={args.num_attention_heads}"
        )
    if args.num_attention_heads % tp:
        errors.append(
            f"--num-attention-heads={args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size={tp}"
        )
    if args.num_query_groups is not None:
        groups = args.num_query_groups
        if args.num_attention_heads % groups:
            errors.append(
                f"--num-query-groups={groups} must divide --num-attention-heads="
                f"{args.num_attention_heads}"
            )
        if groups % tp:
            errors.append(
                f"--num-query-groups={groups} is not divisible by --tensor-model-parallel-size={tp}"
            )

    # Virtual pipeline stages.
    if (
        args.num_layers_per_virtual_pipeline_stage is not None
        and args.num_virtual_stages_per_pipeline_rank is not None
    ):
        errors.append(
            "give only one of --num-layers-per-virtual-pipeline-stage and "
            "--num-virtual-stages-per-pipeline-rank"
        )
    elif args.num_layers_per_virtual_pipeline_stage is not None and args.num_layers % pp == 0:
        per_stage = args.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            errors.append(
                f"--num-layers-per-virtual-pipeline-stage="
                f"{args.num_layers_per_virtual_pipeline_stage} does not divide the "
                f"{per_stage} layers per pipeline stage (--num-layers={args.num_layers} / "
                f"--pipeline-model-parallel-size={pp})"
            )
    elif args.num_virtual_stages_per_pipeline_rank is not None and args.num_layers % pp == 0:
        per_stage = args.num_layers // pp
        if per_stage % args.num_virtual_stages_per_pipeline_rank:
            errors.append(
                f"--num-virtual-stages-per-pipeline-rank="
                f"{args.num_virtual_stages_per_pipeline_rank} does not divide the {per_stage} "
                f"layers per pipeline stage"
            )

    # Batch sizes.
    gbs = args.global_batch_size
    if dp is not None:
        if gbs is None:
            gbs = args.micro_batch_size * dp
        if gbs % (args.micro_batch_size * dp):
            errors.append(
                f"--global-batch-size={gbs} is not divisible by --micro-batch-size="
                f"{args.micro_batch_size} x data-parallel size {dp} = "
                f"{args.micro_batch_size * dp}"
            )

    # Sequence.
    if args.max_position_embeddings is not None and args.position_embedding_type in (
        "learned_absolute",
    ):
        if args.max_position_embeddings < args.seq_length:
            errors.append(
                f"--max-position-embeddings={args.max_position_embeddings} is smaller than "
                f"--seq-length={args.seq_length}"
            )
    # Under --token-pipeline the unsupported-features table names these (one message each).
    if args.position_embedding_type == "relative" and not args.token_pipeline:
        errors.append(
            "--position-embedding-type relative is a T5 embedding; GPT supports "
            "learned_absolute, rope, mrope, none"
        )
    te_usable = args.transformer_impl != "local" and _cuda_available() and _te_importable()
    if cp > 1 and not te_usable and not args.token_pipeline:
        errors.append(
            f"--context-parallel-size={cp} needs --transformer-impl transformer_engine "
            "(the local attention has no context parallelism)"
        )

    # Precision, recompute.
    if args.bf16 and args.fp16:
        errors.append("--bf16 and --fp16 are mutually exclusive")

    if args.recompute_granularity == "selective" and args.recompute_method is not None:
        errors.append(
            "--recompute-method applies to --recompute-granularity full only; drop it for selective"
        )
    if args.recompute_granularity == "full" and args.recompute_method is None:
        errors.append("--recompute-granularity full needs --recompute-method {uniform,block}")
    if args.recompute_method is not None and args.recompute_granularity is None:
        errors.append("--recompute-method needs --recompute-granularity full")

    # Learning rate.
    if args.lr is not None:
        if args.lr < 0:
            errors.append(f"--lr={args.lr} must be >= 0")
        if args.min_lr > args.lr:
            errors.append(f"--min-lr={args.min_lr} is larger than --lr={args.lr}")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        errors.append("give only one of --lr-warmup-iters and --lr-warmup-fraction")
    decay_iters = args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters
    if decay_iters is not None and args.lr_warmup_iters and args.lr_warmup_iters >= decay_iters:
        errors.append(
            f"--lr-warmup-iters={args.lr_warmup_iters} must be smaller than --lr-decay-iters "
            f"(default --train-iters) = {decay_iters}"
        )
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        errors.append("--lr-decay-style WSD needs --lr-wsd-decay-iters")

    # Tokenizer and data.
    if args.tokenizer_type is None:
        errors.append("--tokenizer-type is required; this trainer supports NullTokenizer")
    elif args.tokenizer_type != "NullTokenizer":
        errors.append(
            f"--tokenizer-type {args.tokenizer_type} is not supported by this trainer; use "
            "NullTokenizer with --vocab-size (pre-tokenized data), or upstream Megatron-LM "
            "with its tag's patches/megatron-lm-<tag>.patch"
        )
    elif args.vocab_size is None:
        errors.append("--tokenizer-type NullTokenizer needs --vocab-size")
    # --mock-data and --data-path replace each other (the later wins), so never both here.
    if not args.mock_data and args.data_path is None:
        errors.append("give --mock-data or --data-path")
    elif args.data_path is not None:
        errors.extend(_data_path_errors(args.data_path))

    # Checkpoints.
    if args.save_interval is not None and args.save is None:
        errors.append("--save-interval needs --save")
    if args.ckpt_step is not None and args.load is None:
        errors.append("--ckpt-step needs --load")
    if args.save is not None:
        problem = checkpoint_files.save_problem(args.save)
        if problem:
            errors.append(problem)
    if args.load is not None:
        problem = checkpoint_files.load_problem(args.load, args.ckpt_step, args.save)
        if problem:
            errors.append(problem)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        errors.append(
            "give only one of --override-opt_param-scheduler (take the flags' schedule) and "
            "--use-checkpoint-opt_param-scheduler (keep the checkpoint's)"
        )

    # Devices.
    backend = args.distributed_backend
    if backend == "nccl" and not _cuda_available():
        errors.append("--distributed-backend nccl needs CUDA, which is not available; use gloo")
    if args.transformer_impl == "transformer_engine" and not (
        _cuda_available() and _te_importable()
    ):
        errors.append(
            "--transformer-impl transformer_engine needs Transformer Engine and a GPU; use local"
        )

    if args.tensorboard_dir is not None and not _tensorboard_importable():
        errors.append(
            f"--tensorboard-dir {args.tensorboard_dir} needs the tensorboard package "
            "(pip install tensorboard)"
        )

    # Virtual-pipeline, micro-batch and sequence-parallel layout: one check for every run;
    # token_pipeline_errors would repeat it under --token-pipeline.
    view = _with_dp(args, dp, gbs)
    errors.extend(layout_errors(view))
    errors.extend(token_pipeline_errors(view, include_layout=False))
    return errors


def _with_dp(args: argparse.Namespace, dp: int | None, gbs: int | None) -> argparse.Namespace:
    view = argparse.Namespace(**vars(args))
    view.data_parallel_size = dp
    view.global_batch_size = gbs
    return view


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Raise ArgumentValidationError, or fill Megatron-LM's derived values and return args."""
    errors = validation_errors(args, world_size)
    if errors:
        raise ArgumentValidationError(errors)
    return finalize_args(args, world_size)


def finalize_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Derived values, named as Megatron-LM's validate_args names them."""
    args.world_size = world_size
    args.rank = int(os.environ.get("RANK", "0"))
    tp, pp, cp = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
    )
    args.data_parallel_size = world_size // (tp * pp * cp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    vp = virtual_pipeline_size(args)
    args.virtual_pipeline_model_parallel_size = vp if vp > 1 else None
    if tp == 1 and args.sequence_parallel:
        # Megatron-LM turns it off silently too: with one TP rank there is nothing to split.
        args.sequence_parallel = False
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (
            int(8 * args.hidden_size / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
        )
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    args.group_query_attention = args.num_query_groups != args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if _cuda_available() else "gloo"
    if args.transformer_impl is None:
        usable = args.distributed_backend == "nccl" and _te_importable()
        args.transformer_impl = "transformer_engine" if usable else "local"
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.split is None:
        args.split = "969,30,1"
    # NullTokenizer: ids 0..vocab_size-1 plus EOD, padded like Megatron-LM pads.
    multiple = args.make_vocab_size_divisible_by * tp
    args.padded_vocab_size = int(math.ceil((args.vocab_size + 1) / multiple) * multiple)
    args.params_dtype = "bfloat16" if args.bf16 else ("float16" if args.fp16 else "float32")
    args.consumed_train_samples = 0
    args.iteration = 0
    return resolved_token_pipeline_args(args)


def format_args(args: argparse.Namespace) -> str:
    """Megatron-LM's argument print, so logs from both trainers read alike."""
    lines = ["------------------------ arguments ------------------------"]
    for name in sorted(vars(args), key=str.lower):
        dots = "." * (48 - len(name))
        lines.append(f"  {name} {dots} {getattr(args, name)}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)
