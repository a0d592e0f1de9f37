"""Resuming as Megatron-LM resumes: auto-resume, scheduler flags, damaged or mismatched checkpoints.

One uninterrupted 6-iteration run (one process, PP = 1, tiny GPT) with `--save D --load D` on
a fresh D is the reference: it must start from scratch with a notice, and it saves iterations
3 and 6. Resumes from iteration 3 then check Megatron-LM's scheduler semantics against it:

- flags that change the schedule, with neither flag: exit 2, one message naming each value,
  both settings and both flags;
- `--use-checkpoint-opt_param-scheduler`: the checkpoint's schedule, so iterations 4-6 have the
  reference run's learning rates and losses;
- `--override-opt_param-scheduler`: the new flags' schedule (`--lr 5e-3 --lr-decay-style
  constant`: 5e-3 at every iteration).

Damaged copies of the checkpoint (truncated shard, deleted `.metadata`, truncated common state)
are checked in-process; a changed `--hidden-size` end to end.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from megatron_terapipe.training import checkpoint_checks, checkpoint_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_gpt.py")
TINY_PP1 = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "6",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--hidden-dropout", "0.1", "--attention-dropout", "0", "--log-interval", "1",
    "--eval-iters", "0",
]  # fmt: skip
LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?\| learning rate: ([-+.0-9Ee]+) \|"
    r".*?\| lm loss: ([-+.0-9Ee]+) \|"
)


def run(argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, SCRIPT, *TINY_PP1, *argv], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def iterations(output: str) -> dict[int, tuple[str, str]]:
    """{iteration: (learning rate, loss)} as printed (Megatron-LM's %E formatting)."""
    return {int(it): (lr, loss) for it, lr, loss in LINE.findall(output)}


def ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "ckpt"  # does not exist yet
    output = ok(run(["--save", str(root), "--load", str(root), "--save-interval", "3"]))
    return {"root": str(root), "output": output, "iterations": iterations(output)}


def test_fresh_auto_resume_starts_from_scratch_with_a_notice(reference):
    notices = [ln for ln in reference["output"].splitlines() if "no checkpoint in" in ln]
    assert notices == [
        f" no checkpoint in {reference['root']} yet (--load = --save): starting from scratch"
    ]
    assert sorted(reference["iterations"]) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_files.available_iterations(reference["root"]) == [3, 6]


def test_changed_schedule_without_a_flag_is_an_error_naming_everything(reference):
    root = reference["root"]
    result = run(
        ["--load", root, "--ckpt-step", "3", "--lr", "5e-3", "--lr-decay-style", "constant"]
    )
    assert result.returncode == 2
    assert result.stderr.count("pretrain_gpt.py: error:") == 1
    assert "Traceback" not in result.stderr
    assert (
        f"pretrain_gpt.py: error: the learning-rate schedule differs from checkpoint "
        f"{root}/iter_0000003 (iteration 3): --lr: 0.005 now, 0.001 in the checkpoint; "
        "--lr-decay-style: 'constant' now, 'cosine' in the checkpoint. Give "
        "--override-opt_param-scheduler to use the new flags, or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule"
    ) in result.stderr
    assert "iteration        4/" not in result.stdout


def test_use_checkpoint_scheduler_keeps_the_checkpoints_learning_rates(reference):
    resumed = iterations(
        ok(
            run(
                ["--load", reference["root"], "--ckpt-step", "3", "--lr", "5e-3",
                 "--lr-decay-style", "constant", "--use-checkpoint-opt_param-scheduler"]
            )
        )
    )  # fmt: skip
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):  # learning rate and loss exactly as in the uninterrupted run
        assert resumed[it] == reference["iterations"][it], (it, resumed[it])


def test_override_scheduler_takes_the_new_flags(reference):
    resumed = iterations(
        ok(
            run(
                ["--load", reference["root"], "--ckpt-step", "3", "--lr", "5e-3",
                 "--lr-decay-style", "constant", "--override-opt_param-scheduler"]
            )
        )
    )  # fmt: skip
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[it][0] for it in (4, 5, 6)] == ["5.000000E-03"] * 3
    assert all(reference["iterations"][it][0] != "5.000000E-03" for it in (4, 5, 6))


def test_changed_hidden_size_names_parameter_shapes_and_flag(reference):
    root = reference["root"]
    result = run(["--load", root, "--hidden-size", "64"])
    assert result.returncode == 2
    assert result.stderr.count("pretrain_gpt.py: error:") == 1
    assert "Traceback" not in result.stderr
    assert (
        f"checkpoint {root}/iter_0000006 (iteration 6) does not fit this model: parameter "
        "embedding.word_embeddings.weight has shape [128, 32] in the checkpoint and [128, 64] "
        "here; flags that differ from the checkpoint's: --hidden-size 64 (checkpoint: 32)"
    ) in result.stderr


@pytest.fixture
def damaged(reference, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(reference["root"], root)
    return str(root)


def test_truncated_shard_is_named(damaged):
    # megatron-core writes two shards per rank before 0.17.0, one since: the last one either way
    shards = sorted(glob.glob(os.path.join(damaged, "iter_0000006", "*.distcp")))
    shard = shards[-1]
    size = os.path.getsize(shard)
    os.truncate(shard, size - 1)
    assert checkpoint_checks.file_problem(damaged, 6) == (
        f"checkpoint {damaged}/iter_0000006 (iteration 6) is damaged: {shard} is truncated "
        f"({size - 1} of at least {size} bytes); load the last complete one with --ckpt-step 3 "
        "(complete: [3])"
    )
    assert checkpoint_checks.file_problem(damaged, 3) is None


def test_deleted_metadata_is_named(damaged):
    os.remove(os.path.join(damaged, "iter_0000006", ".metadata"))
    assert checkpoint_checks.file_problem(damaged, 6) == (
        f"checkpoint {damaged}/iter_0000006 (iteration 6) is damaged: "
        f"{damaged}/iter_0000006/.metadata is missing; load the last complete one with "
        "--ckpt-step 3 (complete: [3])"
    )


def test_truncated_common_state_is_named(damaged):
    # common.pt before megatron-core 0.19.0; since, one object in a shard, named by .metadata
    path = os.path.join(damaged, "iter_0000006")
    legacy = os.path.join(path, "common.pt")
    common = legacy if os.path.isfile(legacy) else glob.glob(os.path.join(path, "*.distcp"))[0]
    assert checkpoint_checks.common_state_file(path) == common
    os.truncate(common, 100)
    with pytest.raises(checkpoint_checks.CheckpointError) as exc:
        checkpoint_checks.load_common(damaged, 6)
    message = str(exc.value)
    assert message.startswith(
        f"checkpoint {damaged}/iter_0000006 (iteration 6) is damaged: cannot read its common "
        f"state in {common} ("
    )
    assert message.endswith("load the last complete one with --ckpt-step 3 (complete: [3])")
    assert checkpoint_checks.load_common(damaged, 3)["iteration"] == 3
