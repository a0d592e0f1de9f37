"""Command-line flags shared by the benchmark scripts: Megatron-LM's names for the model and
the layout, plus `--num-microbatches`; `--config` takes a `configs/*.args` entry (the format
pretrain_gpt.py reads), expanded in place so that later flags override it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megatron_terapipe.testing.gpt import TinyGPT

CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))

# Flag defaults: the CPU benchmark model of docs/benchmarks.md.
MODEL_DEFAULTS = {
    "num_layers": 8,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "seq_length": 2048,
    "vocab_size": 128,
    "micro_batch_size": 1,
    "pipeline_model_parallel_size": 2,
    "tensor_model_parallel_size": 1,
    "num_microbatches": 1,
}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("model and layout (Megatron-LM flag names)")
    group.add_argument("--config", action="append", default=[],
                       help="configs/ entry (name or path of a .args file); expanded in place")
    for name, default in MODEL_DEFAULTS.items():
        group.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                           help=f"default {default}")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="with PP ranks only (DP = 1): M = global batch / micro-batch size, "
                       "unless --num-microbatches is given")
    group.add_argument("--seed", type=int, default=1234, help="weight initialisation seed")
    group.add_argument("--data-seed", type=int, default=0)
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
    """Parse, ignoring the flags of a config file that a benchmark has no use for (lr, data)."""
    args, unknown = parser.parse_known_args(expand_argv(argv))
    args.ignored_flags = [t for t in unknown if t.startswith("--")]
    return args


def resolve_model_args(args: argparse.Namespace) -> dict[str, int]:
    """Flag (or config) value, else the default, for every model and layout setting."""
    out = {}
    for name, default in MODEL_DEFAULTS.items():
        value = getattr(args, name)
        out[name] = int(value if value is not None else default)
    if args.num_microbatches is None and getattr(args, "global_batch_size", None):
        out["num_microbatches"] = max(1, args.global_batch_size // out["micro_batch_size"])
    if out["tensor_model_parallel_size"] != 1:
        raise SystemExit("--tensor-model-parallel-size: the CPU benchmark runs TP=1 only")
    return out


def tiny_gpt(values: dict[str, int]) -> TinyGPT:
    return TinyGPT(
        num_layers=values["num_layers"],
        hidden_size=values["hidden_size"],
        num_attention_heads=values["num_attention_heads"],
        seq_length=values["seq_length"],
        vocab_size=values["vocab_size"],
    )


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
