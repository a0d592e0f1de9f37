"""Data guards: an empty split, token ids beyond --vocab-size, a garbage index.

An empty split is one megatron-core's GPT builder finds no token in: it splits by *sequence*
(a document may hold several, or none) and loops forever in `GPTDataset._get_num_epochs` on a
built split without tokens. The checks are called in-process on small indexed datasets; one
subprocess builds, with megatron-core's own builder, every split the guard lets through (the
timeout is the hang detector); end-to-end runs of scripts/pretrain_gpt.py show the 300- and
50-document datasets train under torchrun (PP = 2) and that a dataset too small for its split
fails within seconds, before a dataset is built.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_terapipe.training import args as targs
from megatron_terapipe.training.data_checks import (
    built_split_matrix,
    check_data,
    data_problems,
    documents_per_split,
    split_matrix,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "pretrain_gpt.py")
TINY_PP1 = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "4",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--hidden-dropout", "0", "--attention-dropout", "0",
    "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
]  # fmt: skip
# The command of the report, less --eval-interval and --data-path.
REPORTED = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64",
    "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--seed", "1234",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--train-iters", "3",
    "--eval-iters", "2",
]  # fmt: skip


def write_dataset(
    prefix: str,
    documents: int,
    top_id: int = 63,
    sequences: int = 1,
    empty_tail: int = 0,
    blank_tail: int = 0,
    lengths: tuple[int, int] = (20, 60),
) -> None:
    """`documents` documents of `sequences` sequences of random token ids below `top_id`
    (megatron-core format), each sequence `lengths` tokens long; then `empty_tail` documents
    whose one sequence is empty and `blank_tail` documents without a sequence (what a blank
    input line gives Megatron-LM's preprocess_data.py)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(documents):
        sizes = [int(n) for n in rng.integers(lengths[0], lengths[1], sequences)]
        tokens = rng.integers(0, top_id, sum(sizes))
        tokens[0] = top_id - 1  # every document holds the largest id
        builder.add_document(torch.tensor(tokens, dtype=torch.int32), sizes)
    nothing = torch.zeros(0, dtype=torch.int32)
    for _ in range(empty_tail):
        builder.add_document(nothing, [0])
    for _ in range(blank_tail):
        builder.add_document(nothing, [])
    builder.finalize(prefix + ".idx")


def args_for(prefix: str, *extra: str):
    return targs.validate_args(targs.parse_args([*TINY_PP1, "--data-path", prefix, *extra]), 1)


def problems_for(prefix: str, *extra: str) -> list[str]:
    return data_problems(args_for(prefix, *extra))


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


def test_documents_of_several_sequences_are_split_by_sequence(tmp_path):
    # 10 documents of 30 sentences: megatron-core splits 300 sequences (291, 9, 0), so the
    # valid split has data although it gets no whole document.
    prefix = str(tmp_path / "sentences")
    write_dataset(prefix, 10, sequences=30, lengths=(3, 12))
    problems, warnings = check_data(args_for(prefix))
    assert problems == []
    assert warnings == [
        f"--split 969,30,1 leaves the test split of --data-path {prefix} without documents "
        "(10 documents holding 300 sequences, which megatron-core splits: train 291, valid 9, "
        "test 0); this run never draws from it, so it is not built, but a trainer that builds "
        "it (Megatron-LM's) would hang: --split 98,1,1 gives every split documents"
    ]


def test_split_of_empty_sequences_has_no_tokens(tmp_path):
    # 291 documents, then 9 whose sequence is empty: the valid split holds 9 sequences and no
    # token, which megatron-core's _get_num_epochs never gets past.
    prefix = str(tmp_path / "hollow")
    write_dataset(prefix, 291, empty_tail=9)
    assert problems_for(prefix) == [
        f"--split 969,30,1 leaves the valid split of --data-path {prefix} without tokens (its 9 "
        "sequences are empty) (300 documents: train 291, valid 9, test 0); a split that works: "
        "--split 95,4,1 (or --eval-iters 0 to skip validation)"
    ]
    assert problems_for(prefix, "--split", "95,4,1") == []


def test_documents_without_sequences_leave_megatron_fewer_elements(tmp_path):
    # 30 documents, 20 of them blank: megatron-core splits the 10 sequences, valid gets none,
    # although the 30 documents would give it one.
    prefix = str(tmp_path / "blank")
    write_dataset(prefix, 10, blank_tail=20)
    assert documents_per_split(30, "969,30,1")[1] == 1
    assert problems_for(prefix) == [
        f"--split 969,30,1 leaves the valid split of --data-path {prefix} without documents (30 "
        "documents holding 10 sequences, which megatron-core splits: train 10, valid 0, test 0); "
        "a split that works: --split 90,5,5 (or --eval-iters 0 to skip validation)"
    ]


def test_empty_split_this_run_never_draws_is_a_warning_with_a_split_for_all_three(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, 300)
    # The run of the report: --eval-iters 2 but --eval-interval beyond --train-iters.
    problems, warnings = check_data(args_for(prefix, "--eval-iters", "2", "--eval-interval", "9"))
    assert problems == []
    assert warnings == [
        f"--split 969,30,1 leaves the test split of --data-path {prefix} without documents (300 "
        "documents: train 291, valid 9, test 0); this run never draws from it, so it is not "
        "built, but a trainer that builds it (Megatron-LM's) would hang: --split 98,1,1 gives "
        "every split documents"
    ]
    assert documents_per_split(300, "98,1,1") == [294, 3, 3]
    # No share for the test split, no warning; --eval-iters 0 turns validation off, so an
    # empty valid split is not worth one either.
    assert check_data(args_for(prefix, "--split", "99,1,0")) == ([], [])
    small = str(tmp_path / "small")
    write_dataset(small, 10)
    assert check_data(args_for(small, "--split", "99,1,0", "--eval-iters", "0")) == ([], [])


def test_builder_gets_the_matrix_the_guard_checks(tmp_path):
    from megatron_terapipe.training.data import dataset_config

    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, 20)
    for extra in ((), ("--eval-iters", "0"), ("--split", "90,10,0")):
        args = args_for(prefix, *extra)
        want = built_split_matrix(split_matrix(args.split), args)
        assert dataset_config(args).split_matrix == want
        assert want[2] is None  # no test pass, no test split


# Builds the datasets of each case with megatron-core's own builder, in one process; a case
# that hangs stops the process at the timeout, after the last "built" line.
_BUILD_ALL = """
import sys
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron_terapipe.training import args as targs
from megatron_terapipe.training.data import dataset_config, train_valid_test_num_samples
from megatron_terapipe.training.data_checks import data_problems

base = sys.argv[1].split()
for case in sys.argv[2:]:
    args = targs.validate_args(targs.parse_args(base + case.split()), 1)
    assert data_problems(args) == [], (case, data_problems(args))
    sizes = train_valid_test_num_samples(args)
    built = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, dataset_config(args)
    ).build()
    print("built", case, [None if d is None else len(d) for d in built], flush=True)
"""


def test_every_split_the_guard_lets_through_builds_without_hanging(tmp_path):
    corpus, fifty, hollow, blank = (str(tmp_path / n) for n in ("c", "f", "h", "b"))
    write_dataset(corpus, 300, lengths=(20, 121))
    write_dataset(fifty, 50, lengths=(20, 121))
    write_dataset(hollow, 291, empty_tail=9)
    write_dataset(blank, 10, blank_tail=20)
    cases = [
        f"--data-path {corpus} --eval-iters 2 --eval-interval 1000 --train-iters 3",
        f"--data-path {corpus} --eval-iters 2 --eval-interval 1",
        f"--data-path {fifty} --eval-iters 2 --eval-interval 1000 --train-iters 3",
        f"--data-path {fifty} --eval-iters 2 --eval-interval 1",
        f"--data-path {hollow} --split 95,4,1",
        f"--data-path {blank} --split 90,5,5",
    ]
    base = " ".join(TINY_PP1[:-4])  # without its --eval-interval / --eval-iters
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    try:
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_ALL, base, *cases], cwd=str(tmp_path), env=env,
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        done = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"megatron-core's builder hung after:\n{done}")
    assert result.returncode == 0, result.stderr[-3000:]
    built = [line for line in result.stdout.splitlines() if line.startswith("built")]
    assert len(built) == len(cases), result.stdout


def _run(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _torchrun(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", port, SCRIPT, *argv,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "documents, flags",
    [(300, ["--eval-interval", "1000"]), (50, ["--eval-interval", "1"])],
    ids=["300-docs-no-eval", "50-docs-eval-every-step"],
)
def test_small_datasets_train_under_torchrun_instead_of_hanging(tmp_path, documents, flags):
    # The reported command (PP = 2, 2 gloo ranks, default --split, --eval-iters 2), on 300
    # documents and on 50 with validation at every step. A hang ends at the timeout.
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, documents, top_id=255, lengths=(20, 121))
    result = _torchrun([*REPORTED, *flags, "--data-path", prefix], timeout=90)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "> training finished at iteration 3" in output
    warning = [line for line in output.splitlines() if line.startswith("WARNING: --split")]
    working = {300: "98,1,1", 50: "90,5,5"}[documents]
    assert len(warning) == 1 and "leaves the test split" in warning[0], output[-4000:]
    assert f"--split {working} gives every split documents" in warning[0]
    if flags[1] == "1":
        assert "validation loss at iteration 3" in output


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
