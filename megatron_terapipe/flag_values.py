"""Flag values that several layers read, each parsed and checked in one place.

The argument check (`arguments.py`, the top command-line layer), the planner behind
``--token-pipeline-slices auto`` (`slicing.megatron_args`) and the command-line tools
(`terapipe-plan`, `terapipe-simulate`: output files, `--model` presets) all need them;
defining them here, below all of those, keeps one grammar and one message per rule without a
lower layer importing a higher one.

Plain Python only: the argument check imports this before torch loads.
"""

from __future__ import annotations

import os
from typing import Any

COST_MODEL_FLAG = "--token-pipeline-cost-model"
DEFAULT_COST_MODEL = "profile"

# `--model` presets of terapipe-plan and terapipe-simulate, (num_layers, hidden_size,
# num_attention_heads, seq_length): the paper's GPT-3 models and the CPU demo's tiny one.
MODELS: dict[str, tuple[int, int, int, int]] = {
    "gpt3-1b": (24, 2048, 16, 2048),
    "gpt3-13b": (40, 5120, 40, 2048),
    "gpt3-44b": (96, 6144, 48, 2048),
    "gpt3-175b": (96, 12288, 96, 2048),
    "gpt3-13b-4096": (40, 5120, 40, 4096),
    "gpt3-13b-6144": (40, 5120, 40, 6144),
    "gpt3-13b-8192": (40, 5120, 40, 8192),
    "tiny": (4, 64, 4, 128),  # configs/tiny-cpu.args
}


def cost_model_problem(spec: str | None, flag: str = COST_MODEL_FLAG) -> str | None:
    """Why `spec` names no cost model (None: it does): profile, analytic, analytic:<preset>,
    or an existing .json profile / .npz latency table."""
    if spec is None or spec in ("analytic", "profile") or spec.startswith("analytic:"):
        return None
    if spec.endswith((".json", ".npz")):
        return None if os.path.isfile(spec) else f"{flag}={spec}: no such file"
    if os.path.exists(spec):
        return f"{flag}={spec!r}: a file must end in .json (profile) or .npz (latency table)"
    return (
        f"{flag}={spec!r}: expected analytic, analytic:<preset>, profile, or the path of a "
        ".json profile or .npz latency table"
    )


def parse_cost_model(spec: str | None, flag: str = COST_MODEL_FLAG) -> tuple[str, str | None]:
    """(kind, detail) of a cost-model spec: ('profile', None), ('analytic', preset or None),
    ('latency-table', path) or ('profile-file', path); ValueError (`cost_model_problem`'s
    message) for anything else. None is the default, profile."""
    spec = str(spec or DEFAULT_COST_MODEL)
    problem = cost_model_problem(spec, flag)
    if problem is not None:
        raise ValueError(problem)
    if spec == "profile":
        return "profile", None
    if spec == "analytic" or spec.startswith("analytic:"):
        return "analytic", spec.partition(":")[2] or None
    return ("latency-table" if spec.endswith(".npz") else "profile-file"), spec


def num_microbatches(args: Any) -> int | None:
    """Micro-batches per step per data-parallel rank (global batch / (micro batch x DP)), when
    the Megatron namespace determines it: None when a size is missing or does not divide
    (the argument check names that case)."""
    gbs = getattr(args, "global_batch_size", None)
    mbs = getattr(args, "micro_batch_size", None)
    dp = getattr(args, "data_parallel_size", None)
    if not (gbs and mbs and dp) or gbs % (mbs * dp):
        return None
    return gbs // (mbs * dp)


def slice_multiple(args: Any) -> int:
    """What every token slice must be a multiple of: the tensor-parallel size under sequence
    parallelism (each TP rank holds an equal share of a slice), else 1."""
    tp = int(getattr(args, "tensor_model_parallel_size", None) or 1)
    return tp if getattr(args, "sequence_parallel", False) and tp > 1 else 1


def output_file_problem(flag: str, path: str) -> str | None:
    """Why `path` cannot be written (None: it can), found before any work is done."""
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: directory {folder} does not exist"
    return None


__all__ = [
    "COST_MODEL_FLAG",
    "DEFAULT_COST_MODEL",
    "MODELS",
    "cost_model_problem",
    "num_microbatches",
    "output_file_problem",
    "parse_cost_model",
    "slice_multiple",
]
