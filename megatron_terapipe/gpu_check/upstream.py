"""Step e: upstream Megatron-LM + patches/, one GPU, stock vs --token-pipeline.

MEGATRON_LM_PATH names a checkout of NVIDIA/Megatron-LM at a tag patches/ has a patch for, or
the extracted `git archive` of its training files (scripts/gpu_prepare.sh); megatron-core
itself comes from the installed package (the carried wheel on the GPU machine). The needed
files are copied and the patch applied to the copy, as tests/test_patch.py does; which tag the
tree is at is told by which patch applies (each applies to its own tag only), so a checkout
needs no label. Upstream's training code runs only on the megatron-core release it was tagged
with, so a tree and an installed megatron-core of different releases skip, saying which. Then
upstream's own pretrain_gpt.py trains 10 iterations twice (PP = 1, local spec, mock data, fp32,
no dropout): stock, and with --token-pipeline --token-pipeline-slices 4; every iteration's
`lm loss` (as upstream prints it, 7 significant digits) must agree within the fp32 criterion.

The dry run (no CUDA: upstream stops at "Megatron requires CUDA") runs upstream's argument
parsing and validation with the token flags only, as tests/test_patch.py does.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from megatron_terapipe.gpu_check.common import free_port, judge_losses, step_main
from megatron_terapipe.gpu_check.criteria import FP32_RTOL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATCHES = sorted(glob.glob(os.path.join(REPO, "patches", "megatron-lm-*.patch")))
TREE_FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")
# Copied where the tag has them (core_v0.19.0 has no megatron/legacy).
TREE_DIRS = (
    "megatron/training", "megatron/legacy", "megatron/post_training", "megatron/rl",
)
UPSTREAM_DEPS = ("six", "regex", "triton", "yaml", "pydantic")
ITERATIONS = 10
FLAGS = [
    "--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
    "--seq-length", "1024", "--max-position-embeddings", "1024", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", str(ITERATIONS), "--lr", "1e-4",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--transformer-impl", "local", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
    "--log-interval", "1", "--eval-iters", "0", "--seed", "1234",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-persist-layer-norm",
]  # fmt: skip
TOKEN_FLAGS = ["--token-pipeline", "--token-pipeline-slices", "4"]
LOSS_LINE = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([-+.0-9Ee]+) \|")
# Upstream refuses to parse arguments without CUDA; this reaches its validation on a CPU.
CPU_PARSE_RUNNER = """
import runpy, sys
import torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, ".")
sys.argv = ["pretrain_gpt.py", *sys.argv[1:]]
runpy.run_path("pretrain_gpt.py", run_name="__main__")
"""


def patch_tag(patch: str) -> str:
    """patches/megatron-lm-core_v0.19.0.patch -> core_v0.19.0."""
    return os.path.basename(patch)[len("megatron-lm-"):-len(".patch")]


def _git_apply(tree: str, *args: str) -> subprocess.CompletedProcess:
    """`git apply` in `tree`, which is made a repository of its own first: inside another
    repository's work tree (out/ is in ours) git would take the patch's paths relative to that
    repository's root and skip them. Without git: a failed run, so `patch` is tried."""
    if shutil.which("git") is None:
        return subprocess.CompletedProcess(args, 127, "", "git not found")
    if not os.path.isdir(os.path.join(tree, ".git")):
        subprocess.run(["git", "init", "-q"], cwd=tree, capture_output=True)
    return subprocess.run(["git", "apply", *args], cwd=tree, capture_output=True, text=True)


def _applies(patch: str, tree: str) -> tuple[bool, str]:
    done = _git_apply(tree, "--check", patch)
    if done.returncode != 0 and shutil.which("patch"):
        done = subprocess.run(["patch", "-p1", "--dry-run", "-s", "-i", patch], cwd=tree,
                              capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def patched_tree(checkout: str, work: str) -> tuple[str, str]:
    """A copy of the upstream files the run needs with the patch for its tag applied, and the
    tag."""
    tree = os.path.join(work, "megatron-lm")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    for name in TREE_FILES:
        shutil.copy2(os.path.join(checkout, name), os.path.join(tree, name))
    for name in TREE_DIRS:
        if os.path.isdir(os.path.join(checkout, name)):
            shutil.copytree(os.path.join(checkout, name), os.path.join(tree, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
    failures = []
    for patch in PATCHES:
        if _git_apply(tree, "--reverse", "--check", patch).returncode == 0:
            return tree, patch_tag(patch)  # a checkout patched by hand
        ok, text = _applies(patch, tree)
        if not ok:
            failures.append(f"{os.path.basename(patch)}: {text[-300:]}")
            continue
        done = _git_apply(tree, patch)
        if done.returncode != 0:
            done = subprocess.run(["patch", "-p1", "-s", "-i", patch], cwd=tree,
                                  capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(patch)} does not apply: "
                               f"{done.stdout}{done.stderr}".strip())
        return tree, patch_tag(patch)
    raise RuntimeError(f"no patch in patches/ applies to {checkout} (not a tag we patch?): "
                       + " | ".join(failures))


def release_mismatch(tag: str) -> str | None:
    """Why upstream at `tag` cannot run on the installed megatron-core, or None: a Megatron-LM
    tag core_vX.Y.Z goes with megatron-core X.Y.*."""
    wanted = re.fullmatch(r"core_v(\d+)\.(\d+)\.\d+.*", tag)
    try:
        installed = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None  # a source checkout on the path: nothing to compare against
    have = re.match(r"(\d+)\.(\d+)", installed)
    if wanted and have and wanted.groups() != have.groups():
        return (f"Megatron-LM {tag} needs megatron-core {'.'.join(wanted.groups())}.x; "
                f"megatron-core {installed} is installed")
    return None


def _env(tree: str) -> dict[str, str]:
    path = [tree, REPO, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONWARNINGS="ignore",
                CUDA_DEVICE_MAX_CONNECTIONS="1")


def train(tree: str, flags: list[str], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(free_port()), "pretrain_gpt.py", *flags]
    try:
        done = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"error": f"timed out after {timeout_s:.0f} s", "log_tail": out.splitlines()[-12:]}
    text = done.stdout + done.stderr
    losses = {int(i): float(v) for i, v in LOSS_LINE.findall(text)}
    result: dict[str, Any] = {"losses": [losses[i] for i in sorted(losses)]}
    if done.returncode != 0 or len(losses) != ITERATIONS:
        result.update(error=f"exit status {done.returncode}, {len(losses)} loss lines",
                      log_tail=text.strip().splitlines()[-15:])
    return result


def parse_only(tree: str) -> dict[str, Any]:
    runner = os.path.join(tree, "_parse_upstream.py")
    with open(runner, "w", encoding="utf-8") as handle:
        handle.write(CPU_PARSE_RUNNER)
    env = _env(tree)
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the run ends at process-group start-up, after validation
    done = subprocess.run([sys.executable, runner, *FLAGS, *TOKEN_FLAGS], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=240)
    text = done.stdout + done.stderr
    ok = "> token pipeline: schedule terapipe, slices 4" in text and "token_pipeline_slices " \
        in text
    return {"parsed": ok, "log_tail": [] if ok else text.strip().splitlines()[-15:]}


def run(dry_run: bool, out_dir: str, timeout_s: float = 290.0) -> dict[str, Any]:
    title = (f"upstream Megatron-LM {{tag}} + patch, PP=1, local spec, mock data, {ITERATIONS} "
             "iterations, stock vs --token-pipeline --token-pipeline-slices 4")
    record: dict[str, Any] = {"step": "e", "title": title.format(tag="(no tree)")}
    checkout = os.environ.get("MEGATRON_LM_PATH")
    tags = ", ".join(patch_tag(p) for p in PATCHES)
    if not checkout or not os.path.isfile(os.path.join(checkout, "pretrain_gpt.py")):
        record.update(status="skipped", reason="MEGATRON_LM_PATH is not set to a Megatron-LM "
                      f"checkout or archive at one of {tags} (scripts/gpu_prepare.sh makes one)")
        return record
    missing = [m for m in UPSTREAM_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        record.update(status="skipped", reason="upstream pretrain_gpt.py needs "
                      f"{', '.join(missing)}: not installed (carry their wheels)")
        return record
    try:
        tree, tag = patched_tree(checkout, out_dir)
    except (OSError, RuntimeError) as exc:
        record.update(status="error", reason=str(exc)[:500])
        return record
    record.update(title=title.format(tag=tag), tag=tag)
    mismatch = release_mismatch(tag)
    if mismatch:
        record.update(status="skipped", reason=mismatch)
        return record
    import torch

    if dry_run or not torch.cuda.is_available():
        record.update(parse_only(tree), mode="arguments only (no CUDA)")
        record["status"] = "pass" if record["parsed"] else "fail"
        return record
    stock = train(tree, FLAGS, timeout_s / 2)
    token = train(tree, FLAGS + TOKEN_FLAGS, timeout_s / 2)
    record["flags"] = FLAGS
    return judge_losses(record, stock, token, FP32_RTOL)


if __name__ == "__main__":
    step_main(run)
