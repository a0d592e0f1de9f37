"""Command-line flags shared by the benchmark scripts: Megatron-LM's names for the model and
the layout, plus `--num-microbatches`, and `--config` for a `configs/` entry."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from megatron_terapipe.testing.gpt import TinyGPT

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")

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
    group.add_argument("--config", help="a configs/ entry (name or path, JSON or YAML, keys in "
                       "Megatron-LM's names); explicit flags override it")
    for name, default in MODEL_DEFAULTS.items():
        group.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                           help=f"default {default}")
    group.add_argument("--seed", type=int, default=1234, help="weight initialisation seed")
    group.add_argument("--data-seed", type=int, default=0)
    return parser


def _load_config(name: str) -> dict[str, Any]:
    candidates = [name, os.path.join(CONFIG_DIR, name)]
    candidates += [os.path.join(CONFIG_DIR, name + ext) for ext in (".json", ".yaml", ".yml")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        where = os.path.abspath(CONFIG_DIR)
        raise SystemExit(f"--config {name!r}: no such file (looked in {where})")
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(handle)
        else:
            data = json.load(handle)
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):  # tolerate {"model": {...}, "parallel": {...}} sections
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


def resolve_model_args(args: argparse.Namespace) -> dict[str, int]:
    """Flag > config > default, for every model and layout setting."""
    config = _load_config(args.config) if args.config else {}
    out = {}
    for name, default in MODEL_DEFAULTS.items():
        value = getattr(args, name)
        out[name] = int(value if value is not None else config.get(name, default))
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
