"""scripts/pretrain_gpt.py end to end on CPU: 2 gloo ranks under torchrun, PP = 2.

- The token pipeline (with split backwards, `--token-pipeline-split-backward`, and
  gradient-accumulation fusion, the trainer's default) prints the same `lm loss` per iteration
  as megatron-core's 1F1B (fp32, 1e-5 relative) over 20 iterations (with evaluation at 10 and
  20).
- A checkpoint saved at iteration 10 under the token pipeline, resumed under stock 1F1B,
  gives iterations 11-20 equal to the uninterrupted stock run.
- Bad flags exit before training (status 2, message naming the flags), on every rank.

The three training runs are shared by the tests (module fixture), about 25 s each here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_gpt.py")
TINY = os.path.join(REPO, "configs", "tiny-cpu.args")
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([-+.0-9Ee]+) \|")
VALID_LINE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([-+.0-9Ee]+)")
RTOL = 1e-5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def torchrun(argv: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()), SCRIPT, *argv,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output: str, pattern=LOSS_LINE) -> dict[int, float]:
    return {int(it): float(loss) for it, loss in pattern.findall(output)}


def _check(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    stock = _check(torchrun(["--config", TINY]))
    token = _check(
        torchrun(
            ["--config", TINY, "--token-pipeline", "--token-pipeline-slices", "32,48,48",
             "--token-pipeline-split-backward", "--save", str(ckpt), "--save-interval", "10"]
        )
    )  # fmt: skip
    resumed = _check(torchrun(["--config", TINY, "--load", str(ckpt), "--ckpt-step", "10"]))
    return {"stock": stock, "token": token, "resumed": resumed, "ckpt": ckpt}


def _assert_close(a: dict[int, float], b: dict[int, float], iterations) -> None:
    for it in iterations:
        assert it in a and it in b, (it, sorted(a), sorted(b))
        assert abs(a[it] - b[it]) <= RTOL * abs(b[it]), (it, a[it], b[it])


def test_token_pipeline_matches_stock_1f1b_for_20_iterations(runs):
    stock, token = losses(runs["stock"]), losses(runs["token"])
    assert sorted(stock) == list(range(1, 21))
    _assert_close(token, stock, range(1, 21))
    assert "split backward (B/W)" in runs["token"]
    assert losses(runs["stock"])[20] < losses(runs["stock"])[1]  # it trains
    # Evaluation (forward-only) agrees too.
    _assert_close(losses(runs["token"], VALID_LINE), losses(runs["stock"], VALID_LINE), (10, 20))


def test_log_lines_look_like_megatron_lm(runs):
    line = next(ln for ln in runs["token"].splitlines() if "iteration       20/" in ln)
    for field in (
        "consumed samples:          320",
        "elapsed time per iteration (ms):",
        "throughput per GPU (TFLOP/s/GPU):",
        "tokens per second:",
        "learning rate:",
        "lm loss:",
        "peak memory (MiB):",
        "schedule: terapipe",
    ):
        assert field in line, (field, line)
    assert "schedule: 1f1b" in runs["stock"]
    assert "token slices [32, 48, 48]" in runs["token"]


def test_token_checkpoint_resumes_under_stock_1f1b(runs):
    resumed, stock = losses(runs["resumed"]), losses(runs["stock"])
    assert sorted(resumed) == list(range(11, 21)), sorted(resumed)
    _assert_close(resumed, stock, range(11, 21))
    assert "loading checkpoint from" in runs["resumed"] and "at iteration 10" in runs["resumed"]
    assert "schedule: 1f1b" in runs["resumed"]


def test_pipeline_change_suggests_no_load_rng_and_reshards_with_it(runs):
    # The PP=2 checkpoint of iteration 10, resumed in one process at PP=1: weights and optimizer
    # reshard; only the per-(PP, TP)-rank RNG state cannot follow, and the message says so.
    ckpt = str(runs["ckpt"])
    flags = ["--config", TINY, "--pipeline-model-parallel-size", "1", "--load", ckpt,
             "--ckpt-step", "10", "--exit-interval", "11", "--eval-iters", "0"]  # fmt: skip
    refused = _plain(flags)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.count("pretrain_gpt.py: error:") == 1
    assert (
        f"checkpoint {ckpt}/iter_0000010 (iteration 10) was saved with another parallel layout "
        "(--pipeline-model-parallel-size 1 (checkpoint: 2)); the weights and optimizer state "
        "reshard, but the saved random-number state is per (pipeline, tensor) rank: add "
        "--no-load-rng to resume with fresh RNG streams"
    ) in refused.stderr
    resumed = _check(_plain(flags + ["--no-load-rng"]))
    _assert_close(losses(resumed), losses(runs["stock"]), [11])


def test_checkpoint_directory_layout(runs):
    ckpt = runs["ckpt"]
    names = sorted(os.listdir(ckpt))
    assert names == ["iter_0000010", "iter_0000020", "latest_checkpointed_iteration.txt"], names
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert (ckpt / "iter_0000010" / "metadata.json").is_file()


# -- bad input exits before training ---------------------------------------------------------
def _plain(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_bad_slices_exit_before_training():
    result = _plain(["--config", TINY, "--token-pipeline", "--token-pipeline-slices", "32,32"])
    assert result.returncode == 2
    assert "--token-pipeline-slices=32,32 sums to 64" in result.stderr
    assert "--seq-length=128" in result.stderr
    assert "iteration" not in result.stdout


def test_unknown_flag_fails_loudly():
    result = _plain(["--config", TINY, "--use-flash-attn-v7"])
    assert result.returncode == 2
    assert "unrecognized arguments: --use-flash-attn-v7" in result.stderr


def test_empty_load_dir_exits_under_torchrun_before_training(tmp_path):
    # Every rank validates; only rank 0 prints, so the message appears exactly once, and the
    # children exit with status 2 without a traceback (torchrun then reports the failure).
    result = torchrun(["--config", TINY, "--load", str(tmp_path)], timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"--load {tmp_path} holds no checkpoint") == 1, output[-3000:]
    assert output.count("pretrain_gpt.py: error:") == 1
    assert "exitcode  : 2" in output
    assert "validate_args" not in output and "ArgumentValidationError" not in output
    assert "iteration " not in result.stdout
    assert "number of parameters" not in output  # no model was built


def test_planner_failure_exits_before_building_the_model():
    result = torchrun(
        ["--config", TINY, "--token-pipeline", "--token-pipeline-memory-cap", "1e-7"], timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "token pipeline set-up failed" in output and "--token-pipeline-memory-cap 1e-07" in output
    )
    assert "no plan fits" in output, output[-3000:]
    assert "number of parameters" not in output


def _write_indexed_dataset(prefix: str) -> None:
    """A small megatron-core indexed dataset (.bin/.idx) of counting documents."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        length = int(rng.integers(50, 400))
        doc = (int(rng.integers(0, 255)) + np.arange(length)) % 255
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [length])
    builder.finalize(prefix + ".idx")


def test_indexed_dataset_with_token_pipeline(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    _write_indexed_dataset(prefix)
    flags = [
        "--data-path", prefix, "--split", "90,8,2", "--data-cache-path", str(tmp_path / "cache"),
        "--train-iters", "4", "--lr-warmup-iters", "1", "--eval-interval", "2", "--eval-iters", "1",
        "--token-pipeline", "--token-pipeline-slices", "2",
    ]  # fmt: skip
    base = [t for t in _config_tokens(TINY) if t != "--mock-data"]
    output = _check(torchrun(base + flags))
    train = losses(output)
    assert sorted(train) == [1, 2, 3, 4]
    assert train[4] < train[1]
    assert sorted(losses(output, VALID_LINE)) == [2, 4]
    assert os.listdir(tmp_path / "cache")  # megatron-core cached its sample indices


def _config_tokens(path: str) -> list[str]:
    from megatron_terapipe.training.config_files import read_config

    return read_config(path)


def test_overlap_grad_reduce_trains_like_the_synchronous_reduction():
    """--overlap-grad-reduce (DDP reduces buckets during the token pipeline's backward; aligned:
    each chunk's start_grad_sync after its last backward) against the reduction at the end of
    the step, data-parallel 2: same losses (a reduction never started makes megatron-core's
    finish_grad_sync fail; one started before the last backward reduces partial gradients)."""
    common = [
        "--config", TINY, "--pipeline-model-parallel-size", "1", "--train-iters", "4",
        "--eval-iters", "0", "--token-pipeline", "--token-pipeline-slices", "4",
    ]  # fmt: skip
    plain = losses(_check(torchrun(common)))
    overlapped = losses(_check(torchrun(common + ["--overlap-grad-reduce"])))
    _assert_close(overlapped, plain, range(1, 5))
