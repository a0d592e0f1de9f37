"""Command-line flags of the benchmark scripts: pretrain_gpt.py's own model and layout flags.

The flags are not re-declared: `add_model_args` copies the "network size", "mixture of experts"
and "parallelism" groups (and the model-shaping training flags) out of
`training.args.build_parser()`, so the benchmark accepts exactly what pretrain_gpt.py accepts
for the model and layout, with the same defaults and choices. `model_args` then runs
pretrain_gpt.py's own validation and derivation (`training.args.validate_args`), and
`training.model` builds the chunks from the result: one path from flags to GPTModel for
trainer, benchmark and demo.

`--config` takes a `configs/*.args` entry (the format pretrain_gpt.py reads), expanded in
place so that later flags override it; pretrain_gpt.py flags that do not shape the model
(learning rate, data, logging) are accepted and ignored, anything else is an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))

# "mixture of experts": an MoE GPT (--num-experts, --moe-router-topk, ...) is benchmarked as
# the dense one, stock 1F1B on the same kernel being the baseline.
MODEL_GROUPS = ("network size", "mixture of experts", "parallelism")
# pretrain_gpt.py's "training"/"data" flags that shape the model or the step.
MODEL_TRAINING_FLAGS = (
    "--micro-batch-size", "--global-batch-size", "--seq-length", "--bf16", "--fp16",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--seed",
    "--vocab-size", "--no-gradient-accumulation-fusion",
)  # fmt: skip
# Chosen per row by the benchmark itself (it runs both kernels), so not a model flag here.
PER_ROW_FLAGS = ("--attention-backend",)
VIRTUAL_STAGE_DESTS = ("num_layers_per_virtual_pipeline_stage",
                       "num_virtual_stages_per_pipeline_rank")

# Defaults: the CPU benchmark model of docs/benchmarks.md. Dropout is off (pretrain_gpt.py's
# default is 0.1) so that every schedule computes the same loss on the same weights and data.
MODEL_DEFAULTS = {
    "num_layers": 8,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "seq_length": 2048,
    "vocab_size": 128,
    "micro_batch_size": 1,
    "pipeline_model_parallel_size": 2,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}


def _model_actions(source: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = []
    for group in source._action_groups:
        for action in group._group_actions:
            flags = set(action.option_strings)
            if flags & set(PER_ROW_FLAGS):
                continue
            if group.title in MODEL_GROUPS or flags & set(MODEL_TRAINING_FLAGS):
                actions.append(action)
    return actions


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """pretrain_gpt.py's model and layout flags (copied from its parser), plus --config and
    --num-microbatches; defaults are the benchmark model's."""
    from megatron_terapipe.training.args import build_parser

    group = parser.add_argument_group("model and layout (pretrain_gpt.py's flags)")
    group.add_argument("--config", action="append", default=[],
                       help="configs/ entry (name or path of a .args file); expanded in place")
    for action in _model_actions(build_parser()):
        group._add_action(action)
    group.add_argument("--num-microbatches", type=int, default=None,
                       help="micro-batches per step (default: --global-batch-size / "
                       "--micro-batch-size, else 1)")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic tokens")
    parser.set_defaults(**MODEL_DEFAULTS)
    return parser


def _config_path(name: str) -> str:
    for candidate in (name, os.path.join(CONFIG_DIR, name),
                      os.path.join(CONFIG_DIR, name + ".args")):
        if os.path.isfile(candidate):
            return candidate
    raise SystemExit(f"--config {name!r}: no such file (configs live in {CONFIG_DIR})")


def expand_argv(argv: Sequence[str] | None) -> list[str]:
    """argv with `--config NAME` resolved in configs/ and replaced by the file's flags."""
    from megatron_terapipe.training.config_files import expand_config_args

    tokens = list(sys.argv[1:] if argv is None else argv)
    out = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "--config" and i + 1 < len(tokens):
            out += ["--config", _config_path(tokens[i + 1])]
            i += 2
            continue
        if tokens[i].startswith("--config="):
            out.append("--config=" + _config_path(tokens[i].split("=", 1)[1]))
        else:
            out.append(tokens[i])
        i += 1
    return expand_config_args(out)


def parse_with_configs(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                       ) -> argparse.Namespace:
    """Parse; pretrain_gpt.py flags that do not shape the model are ignored (listed in
    `args.ignored_flags`), flags pretrain_gpt.py does not know either are errors."""
    from megatron_terapipe.training.args import build_parser

    args, unknown = parser.parse_known_args(expand_argv(argv))
    known_to_pretrain = build_parser()._option_string_actions
    flags = [t.split("=", 1)[0] for t in unknown if t.startswith("-")]
    foreign = [f for f in flags if f not in known_to_pretrain or f in PER_ROW_FLAGS]
    if foreign:
        parser.error(f"unrecognized arguments: {' '.join(foreign)} (the benchmark takes "
                     "pretrain_gpt.py's model and layout flags and its own, see --help)")
    args.ignored_flags = flags
    return args


def num_microbatches(args: argparse.Namespace) -> int:
    if args.num_microbatches is not None:
        return int(args.num_microbatches)
    if args.global_batch_size:
        return max(1, args.global_batch_size // args.micro_batch_size)
    return 1


def virtual_stages(args: argparse.Namespace) -> int | None:
    """V from pretrain_gpt.py's virtual-stage flags, if given (the stock interleaved row's)."""
    if args.num_virtual_stages_per_pipeline_rank is not None:
        return args.num_virtual_stages_per_pipeline_rank
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers // args.pipeline_model_parallel_size
        return max(1, per_stage // args.num_layers_per_virtual_pipeline_stage)
    return None


def model_args(args: argparse.Namespace, microbatches: int) -> argparse.Namespace:
    """A complete, validated pretrain_gpt.py namespace for the benchmark model (DP = 1).

    The same `training.args.validate_args` that pretrain_gpt.py runs checks the flags and fills
    the derived values (ffn size, padded vocabulary, ...); `training.model` builds from it.
    Virtual stages are left out: the benchmark builds the interleaved row's chunks itself.
    """
    from megatron_terapipe.training.args import ArgumentValidationError, build_parser, validate_args

    if (args.tensor_model_parallel_size != 1 or args.context_parallel_size != 1
            or args.expert_model_parallel_size != 1):
        raise SystemExit(
            f"--tensor-model-parallel-size={args.tensor_model_parallel_size}, "
            f"--context-parallel-size={args.context_parallel_size}, "
            f"--expert-model-parallel-size={args.expert_model_parallel_size}: the benchmark "
            "runs one pipeline of PP ranks (TP = CP = EP = 1)"
        )
    full = build_parser().parse_args([
        "--train-iters", "1", "--lr", "0", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--eval-iters", "0", "--distributed-backend", "gloo",
    ])  # fmt: skip
    for action in _model_actions(build_parser()):
        setattr(full, action.dest, getattr(args, action.dest))
    for dest in VIRTUAL_STAGE_DESTS:
        setattr(full, dest, None)
    full.distributed_backend = "gloo"  # compat.run_distributed's ranks
    full.global_batch_size = microbatches * args.micro_batch_size
    try:
        return validate_args(full, world_size=args.pipeline_model_parallel_size)
    except ArgumentValidationError as exc:
        raise SystemExit(str(exc)) from None


def add_split_backward_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--split-backward {off,on,both} of the benchmark scripts (`spec.with_split_backward`)."""
    from megatron_terapipe.benchmark.spec import SPLIT_BACKWARD_MODES

    parser.add_argument("--split-backward", choices=SPLIT_BACKWARD_MODES, default="off",
                        help="token rows with split backwards (--token-pipeline-split-backward): "
                        "off, on, or both (each row next to its split twin, same rounds); on/"
                        "both add token-1f1b S=1 split (the B/W split alone)")
    return parser


def add_contention_probe_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--no-contention-probe of the benchmark scripts (`benchmark.contention`)."""
    parser.add_argument("--no-contention-probe", action="store_true",
                        help="skip the per-round probe of how much slower a stage computes "
                        "while the other ranks compute too (it adds PP + 1 stage steps a round)")
    return parser


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
