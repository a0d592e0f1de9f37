"""Start-up profiling leaves training bit-identical.

`--token-pipeline-cost-model profile --token-pipeline-slices auto` builds and times a private
block of layers on rank 0 before the model exists. It used to draw from the global RNGs (weight
initialisation, random inputs), so the model's initial weights - and the loss - differed from a
run given the same slices explicitly. The check: the profiled plan's run and a run with the
plan's slices as `--token-pipeline-slices l1,l2,...` print identical losses, with dropout on
(so the RNG stream during training matters too, not only the initial weights).

One process, PP = 1 (`--token-pipeline` is allowed there, with a warning): the profiling rank is
the training rank.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_gpt.py")
TINY_PP1 = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "4",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--log-interval", "1",
    "--eval-interval", "2", "--eval-iters", "1", "--token-pipeline",
]  # fmt: skip
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([-+.0-9Ee]+) \|")
VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([-+.0-9Ee]+)")
SLICES = re.compile(r"> schedule: terapipe \(token slices \[([0-9, ]+)\]\)")


def run(argv: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, SCRIPT, *TINY_PP1, *argv], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def test_profiled_plan_trains_exactly_like_its_slices_given_explicitly():
    profiled = run(["--token-pipeline-cost-model", "profile", "--token-pipeline-slices", "auto"])
    (slices,) = SLICES.findall(profiled)
    slices = slices.replace(" ", "")
    explicit = run(["--token-pipeline-slices", slices + ("," if "," not in slices else "")])
    assert f"token slices [{slices.replace(',', ', ')}]" in explicit
    assert len(LOSS.findall(profiled)) == 4 and len(VALID.findall(profiled)) == 2
    assert LOSS.findall(profiled) == LOSS.findall(explicit)  # the printed digits, all of them
    assert VALID.findall(profiled) == VALID.findall(explicit)
    warnings = [ln for ln in explicit.splitlines() if ln.startswith("WARNING: --token-pipeline")]
    assert len(warnings) == 1 and "--pipeline-model-parallel-size 1" in warnings[0]
