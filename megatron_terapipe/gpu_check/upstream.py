"""Step e: upstream Megatron-LM + patches/, one GPU, stock vs --token-pipeline.

MEGATRON_LM_PATH names a checkout of NVIDIA/Megatron-LM at a tag patches/ has a patch for, or
the extracted `git archive` of its training files (scripts/gpu_prepare.sh); megatron-core
itself comes from the installed package (the carried wheel on the GPU machine). The needed
files are copied and the patch applied to the copy in Python (`apply_patch`: the GPU machine
may lack git and patch; gpu_prepare.sh runs the same code on the archive before the device
call), and a `make` shim goes first on PATH for upstream's dataset-helper build; which tag the
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
import sys
from dataclasses import dataclass
from typing import Any

from megatron_terapipe.gpu_check.common import (
    free_port,
    inner_timeout,
    judge_losses,
    run_group,
    step_main,
)
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


@dataclass
class _Hunk:
    old_start: int
    new_start: int
    old: list[str]
    new: list[str]
    header: str


def parse_patch(text: str) -> dict[str, list[_Hunk]]:
    """A `git diff` patch's hunks by file path (b/ side). Only changed files: the GPU machine
    may have neither git nor patch, so the patch is applied here in Python; a patch that adds,
    deletes or renames a file is refused by name (ours only change files)."""
    files: dict[str, list[_Hunk]] = {}
    path = None
    hunk: _Hunk | None = None
    left = [0, 0]  # old and new lines the current hunk still has
    for line in text.splitlines():
        if hunk is not None and (left[0] > 0 or left[1] > 0):
            kind, text_ = line[:1], line[1:]
            if kind in (" ", ""):  # context ("" where an editor stripped a blank line's space)
                hunk.old.append(text_)
                hunk.new.append(text_)
                left[0] -= 1
                left[1] -= 1
            elif kind == "-":
                hunk.old.append(text_)
                left[0] -= 1
            elif kind == "+":
                hunk.new.append(text_)
                left[1] -= 1
            elif kind != "\\":  # "\ No newline at end of file"
                raise ValueError(f"patch line {line!r} inside hunk {hunk.header}")
            continue
        if line.startswith("diff --git "):
            path, hunk = None, None
        elif line.startswith(("new file mode", "deleted file mode", "rename from", "copy from")):
            raise ValueError(f"patch line {line!r}: only changes to existing files are applied")
        elif line.startswith("+++ "):
            target = line[4:].split("\t")[0]
            path = target[2:] if target.startswith("b/") else target
            files.setdefault(path, [])
        elif line.startswith("@@ "):
            match = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line)
            if path is None or match is None:
                raise ValueError(f"patch hunk header {line!r} outside a file or malformed")
            hunk = _Hunk(int(match.group(1)), int(match.group(3)), [], [], line)
            left = [int(match.group(2) or 1), int(match.group(4) or 1)]
            files[path].append(hunk)
    return files


def _find(lines: list[str], block: list[str], near: int) -> int | None:
    """Where `block` starts in `lines`, the match nearest `near` (patch's fuzz-free offset)."""
    width = len(block)
    starts = [i for i in range(len(lines) - width + 1) if lines[i:i + width] == block]
    return min(starts, key=lambda i: abs(i - near), default=None)


def apply_patch(patch: str, tree: str, reverse: bool = False, check: bool = False
                ) -> tuple[bool, str]:
    """Apply (or, with `reverse`, undo) `patch` to the files under `tree`; with `check` only
    say whether it would. Every hunk must match its context exactly (at any offset, as
    `git apply` allows); nothing is written unless every hunk of every file matches."""
    with open(patch, encoding="utf-8") as handle:
        files = parse_patch(handle.read())
    results: dict[str, str] = {}
    for path, hunks in files.items():
        full = os.path.join(tree, path)
        if not os.path.isfile(full):
            return False, f"{path}: not in {tree}"
        with open(full, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        shift = 0
        for hunk in hunks:
            old, new = (hunk.new, hunk.old) if reverse else (hunk.old, hunk.new)
            start = (hunk.new_start if reverse else hunk.old_start) - 1
            # -N,0 (no old lines) inserts after line N.
            at = _find(lines, old, start + shift) if old else start + 1 + shift
            if at is None:
                return False, f"{path}: hunk {hunk.header} does not match"
            lines[at:at + len(old)] = new
            shift = at - start + len(new) - len(old)
        results[full] = "\n".join(lines)
    if not check:
        for full, text in results.items():
            with open(full, "w", encoding="utf-8") as handle:
                handle.write(text)
    return True, ""


def patched_tree(checkout: str, work: str) -> tuple[str, str]:
    """A copy of the upstream files the run needs with the patch for its tag applied, and the
    tag (a checkout already patched by hand is taken as it is)."""
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
        if apply_patch(patch, tree, reverse=True, check=True)[0]:
            return tree, patch_tag(patch)
        ok, text = apply_patch(patch, tree)
        if ok:
            return tree, patch_tag(patch)
        failures.append(f"{os.path.basename(patch)}: {text[-300:]}")
    raise RuntimeError(f"no patch in patches/ applies to {checkout} (not a tag we patch?): "
                       + " | ".join(failures))


MAKE_SHIM = """#!{python}
# Written by the GPU check's step e. Upstream's initialisation runs
# `make -C megatron/core/datasets` to build the dataset helpers; the megatron-core wheel ships
# them prebuilt and the GPU machine may have no make. With a real make and a Makefile there,
# that make runs; with a prebuilt helpers_cpp, nothing needs building.
import glob, os, shutil, subprocess, sys
args = sys.argv[1:]
target = args[args.index("-C") + 1] if "-C" in args[:-1] else "."
real = shutil.which("make", path=os.environ.get("GPU_CHECK_REAL_PATH", ""))
if real and os.path.exists(os.path.join(target, "Makefile")):
    sys.exit(subprocess.call([real, *args]))
if glob.glob(os.path.join(target, "helpers_cpp*.so")):
    print("make (gpu_check shim): helpers_cpp is prebuilt in", target)
    sys.exit(0)
sys.exit("make (gpu_check shim): no make and no prebuilt helpers_cpp in " + target)
"""


def make_shim(directory: str) -> str:
    """A folder with the `make` of MAKE_SHIM, to go first on PATH."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "make")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(MAKE_SHIM.format(python=sys.executable))
    os.chmod(path, 0o755)
    return directory


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
    shim = make_shim(os.path.join(tree, "_gpu_check_bin"))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONWARNINGS="ignore",
                CUDA_DEVICE_MAX_CONNECTIONS="1",
                PATH=os.pathsep.join([shim, os.environ.get("PATH", "")]),
                GPU_CHECK_REAL_PATH=os.environ.get("PATH", ""))


def train(tree: str, flags: list[str], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(free_port()), "pretrain_gpt.py", *flags]
    done, text = run_group(cmd, timeout_s, cwd=tree, env=_env(tree))
    if done is None:
        return {"error": f"timed out after {timeout_s:.0f} s",
                "log_tail": text.strip().splitlines()[-12:]}
    losses = {int(i): float(v) for i, v in LOSS_LINE.findall(text)}
    result: dict[str, Any] = {"losses": [losses[i] for i in sorted(losses)]}
    if done.returncode != 0 or len(losses) != ITERATIONS:
        result.update(error=f"exit status {done.returncode}, {len(losses)} loss lines",
                      log_tail=text.strip().splitlines()[-15:])
    return result


def parse_only(tree: str, timeout_s: float) -> dict[str, Any]:
    runner = os.path.join(tree, "_parse_upstream.py")
    with open(runner, "w", encoding="utf-8") as handle:
        handle.write(CPU_PARSE_RUNNER)
    env = _env(tree)
    env.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the run ends at process-group start-up, after validation
    done, text = run_group([sys.executable, runner, *FLAGS, *TOKEN_FLAGS], timeout_s, cwd=tree,
                           env=env)
    if done is None:
        return {"parsed": False, "log_tail": [f"timed out after {timeout_s:.0f} s",
                                              *text.strip().splitlines()[-12:]]}
    ok = "> token pipeline: schedule terapipe, slices 4" in text and "token_pipeline_slices " \
        in text
    return {"parsed": ok, "log_tail": [] if ok else text.strip().splitlines()[-15:]}


def run(dry_run: bool, out_dir: str, deadline: float | None = None) -> dict[str, Any]:
    """Stock then token training run (or, without CUDA, the argument parsing alone); the
    stock run may take half of what is left of the step's window (`deadline`)."""
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
        record.update(parse_only(tree, inner_timeout(deadline)), mode="arguments only (no CUDA)")
        record["status"] = "pass" if record["parsed"] else "fail"
        return record
    stock = train(tree, FLAGS, inner_timeout(deadline, 0.5))
    token = train(tree, FLAGS + TOKEN_FLAGS, inner_timeout(deadline))
    record["flags"] = FLAGS
    return judge_losses(record, stock, token, FP32_RTOL)


if __name__ == "__main__":
    step_main(run)
