"""patches/megatron-lm-core_v0.16.1.patch against a real Megatron-LM checkout.

Set MEGATRON_LM_PATH to a checkout of NVIDIA/Megatron-LM at tag core_v0.16.1 (patched or not;
it is never modified: the files the run needs are copied). The parse checks run upstream's own
pretrain_gpt.py up to and including its argument validation, which needs `six regex triton
pyyaml pydantic` next to megatron-core; without them those checks skip and say so.

On a machine without CUDA, upstream's initialize_megatron stops at "Megatron requires CUDA"
before parsing; the runner reports CUDA as available so that parsing and validation run, and
the run then ends at process-group start-up, after the argument table was printed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = os.path.join(REPO, "patches", "megatron-lm-core_v0.16.1.patch")
CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
PATCHED_FILES = (
    "pretrain_gpt.py",
    "gpt_builders.py",
    "megatron/training/arguments.py",
    "megatron/training/training.py",
)
UPSTREAM_DEPS = ("six", "regex", "triton", "yaml", "pydantic")

needs_checkout = pytest.mark.skipif(
    not CHECKOUT or not os.path.isfile(os.path.join(CHECKOUT or "", "pretrain_gpt.py")),
    reason="MEGATRON_LM_PATH is not set to a Megatron-LM checkout (tag core_v0.16.1); "
    "e.g. git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM && "
    "MEGATRON_LM_PATH=$PWD/Megatron-LM pytest tests/test_patch.py",
)

RUNNER = """
import runpy, sys
import torch
torch.cuda.is_available = lambda: True  # reach upstream's argument checks on a CPU machine
sys.path.insert(0, ".")
sys.argv = ["pretrain_gpt.py", *sys.argv[1:]]
runpy.run_path("pretrain_gpt.py", run_name="__main__")
"""

FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
    "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--transformer-impl", "local",
    "--pipeline-model-parallel-size", "2",
]  # fmt: skip


def test_patch_is_small_and_touches_only_entry_points():
    with open(PATCH, encoding="utf-8") as handle:
        text = handle.read()
    files = [line.split(" b/")[-1] for line in text.splitlines() if line.startswith("diff --git")]
    assert sorted(files) == sorted(PATCHED_FILES)
    added = [ln for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert len(added) <= 20, len(added)


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory):
    """A copy of the checkout's Python sources with the patch applied."""
    tree = tmp_path_factory.mktemp("megatron-lm")
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy2(os.path.join(CHECKOUT, name), tree / name)
    shutil.copytree(
        os.path.join(CHECKOUT, "megatron"),
        tree / "megatron",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    reverse = subprocess.run(
        ["git", "apply", "--reverse", "--check", PATCH], cwd=tree, capture_output=True
    )
    if reverse.returncode == 0:
        return tree, "already applied"
    check = subprocess.run(["git", "apply", "--check", PATCH], cwd=tree, capture_output=True)
    assert check.returncode == 0, check.stderr.decode()
    subprocess.run(["git", "apply", PATCH], cwd=tree, check=True)
    return tree, "applied"


@needs_checkout
def test_patch_applies(patched_tree):
    tree, how = patched_tree
    assert how in ("applied", "already applied")
    with open(tree / "pretrain_gpt.py", encoding="utf-8") as handle:
        assert "token_pipeline.combined_extra_args_provider" in handle.read()


def _run_upstream(tree, flags):
    missing = [m for m in UPSTREAM_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"upstream pretrain_gpt.py needs {', '.join(missing)} (pip install them)")
    (tree / "_run_upstream.py").write_text(RUNNER)
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", PYTHONWARNINGS="ignore")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # end the run at process-group start-up, after validation
    result = subprocess.run(
        [sys.executable, "_run_upstream.py", *flags],
        cwd=tree, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return result.stdout + result.stderr


@needs_checkout
def test_patched_pretrain_gpt_parses_and_validates_token_flags(patched_tree):
    tree, _ = patched_tree
    output = _run_upstream(
        tree, FLAGS + ["--token-pipeline", "--token-pipeline-slices", "32,32,64",
                       "--token-pipeline-schedule", "token-1f1b"]
    )  # fmt: skip
    assert "TokenPipelineArgumentError" not in output, output[-4000:]
    assert "> token pipeline: schedule token-1f1b, slices 32,32,64" in output, output[-4000:]
    for row in ("token_pipeline ", "token_pipeline_slices ", "token_pipeline_schedule "):
        assert row in output, row  # in Megatron-LM's own argument table
    assert "(32, 32, 64)" in output


@needs_checkout
def test_patched_pretrain_gpt_rejects_bad_token_flags_in_validation(patched_tree):
    tree, _ = patched_tree
    output = _run_upstream(tree, FLAGS + ["--token-pipeline", "--token-pipeline-slices", "32,32"])
    assert "TokenPipelineArgumentError" in output, output[-4000:]
    assert "--token-pipeline-slices=32,32 sums to 64" in output
    assert "token_pipeline_slices ...." not in output  # stopped before the argument table
