"""Data guards: a split without documents, token ids beyond --vocab-size, a garbage index.

The checks are called in-process on small indexed datasets; two end-to-end runs of
scripts/pretrain_gpt.py (one process, PP = 1) show that the case which used to hang forever
(300 documents, default --split 969,30,1, --eval-iters > 0: megatron-core built the empty test
split and looped in GPTDataset._get_num_epochs) now trains, and that a dataset too small for
its split fails within seconds, before a dataset is built.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from megatron_terapipe.training import args as targs
from megatron_terapipe.training.data_checks import data_problems, documents_per_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_gpt.py")
TINY_PP1 = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "4",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
]  # fmt: skip


def write_dataset(prefix: str, documents: int, top_id: int = 63) -> None:
    """`documents` documents of 20-59 random token ids below `top_id` (megatron-core format)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(documents):
        length = int(rng.integers(20, 60))
        tokens = rng.integers(0, top_id, length)
        tokens[0] = top_id - 1  # every document holds the largest id
        builder.add_document(torch.tensor(tokens, dtype=torch.int32), [length])
    builder.finalize(prefix + ".idx")


def problems_for(prefix: str, *extra: str) -> list[str]:
    args = targs.validate_args(targs.parse_args([*TINY_PP1, "--data-path", prefix, *extra]), 1)
    return data_problems(args)


def test_split_rounding_is_megatron_cores(tmp_path):
    # 300 documents under 969,30,1: 291 train, 9 valid, 0 test (round(299.7) = round(300)).
    assert documents_per_split(300, "969,30,1") == [291, 9, 0]
    assert documents_per_split(10, "969,30,1") == [10, 0, 0]
    assert documents_per_split(10, "90,5,5") == [9, 1, 0]


def test_split_without_documents_names_split_counts_and_a_working_split(tmp_path):
    prefix = str(tmp_path / "small")
    write_dataset(prefix, 10)
    assert problems_for(prefix) == [
        f"--split 969,30,1 leaves the valid split of --data-path {prefix} without documents "
        "(10 documents: train 10, valid 0, test 0); a split that works: --split 90,5,5 (or "
        "--eval-iters 0 to skip validation)"
    ]
    # The suggestion works, and without evaluation the valid split is not drawn at all.
    assert problems_for(prefix, "--split", "90,5,5") == []
    assert problems_for(prefix, "--eval-iters", "0") == []
    # The test split is never drawn by this trainer: an empty one is fine.
    assert problems_for(prefix, "--split", "90,10,0") == []
    errors = problems_for(prefix, "--split", "0,1,0")
    assert len(errors) == 1 and "leaves the train split" in errors[0], errors


def test_token_ids_beyond_the_vocabulary_name_file_and_value(tmp_path):
    prefix = str(tmp_path / "wide")
    write_dataset(prefix, 20, top_id=300)
    assert problems_for(prefix, "--split", "80,20,0") == [
        f"--data-path {prefix}: {prefix}.bin holds token id 299, but --vocab-size 63 allows "
        "ids 0..63 (63 = end of document); set --vocab-size to at least 300"
    ]
    assert problems_for(prefix, "--split", "80,20,0", "--vocab-size", "300") == []


def test_garbage_index_names_the_file(tmp_path):
    prefix = str(tmp_path / "junk")
    (tmp_path / "junk.idx").write_bytes(bytes(range(40)))
    (tmp_path / "junk.bin").write_bytes(b"\0" * 64)
    (problem,) = problems_for(prefix)
    assert problem.startswith(
        f"--data-path {prefix}: {prefix}.idx is not a megatron-core index file (its header is "
    ), problem
    # A valid header with a truncated body: megatron-core's own reader fails, still named.
    write_dataset(prefix, 5)
    with open(prefix + ".idx", "r+b") as handle:
        handle.truncate(30)
    (problem,) = problems_for(prefix)
    assert problem.startswith(
        f"--data-path {prefix}: {prefix}.idx is not a readable megatron-core index file"
    ), problem


def _run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_default_split_on_300_documents_trains_instead_of_hanging(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, 300)
    # Before the fix this never returned (the timeout is the hang detector).
    result = _run([*TINY_PP1, "--data-path", prefix], timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "validation loss at iteration 4" in output
    assert "iteration        4/       4" in output


def test_too_small_dataset_fails_within_seconds_end_to_end(tmp_path):
    prefix = str(tmp_path / "small")
    write_dataset(prefix, 10)
    result = _run([*TINY_PP1, "--data-path", prefix], timeout=60)  # seconds, not a hang
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("pretrain_gpt.py: error: invalid data:") == 1
    assert "a split that works: --split 90,5,5" in result.stderr
    assert "Traceback" not in result.stderr
    assert "number of parameters" not in result.stdout  # before any model or dataset


def test_mock_data_is_not_checked():
    args = targs.validate_args(targs.parse_args([*TINY_PP1, "--mock-data"]), 1)
    assert data_problems(args) == []
