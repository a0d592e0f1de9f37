"""Data guards: what megatron-core's dataset builder would hang or crash on, found up front.

megatron-core's `GPTDataset` loops forever when a split it is asked to draw from holds no
document (``_get_num_epochs`` waits for an epoch to yield tokens), a garbage ``.idx`` ends in an
assertion deep in the builder, and a token id beyond the vocabulary only fails inside the
embedding on the first batch. These checks read the index files once, before any rank builds a
dataset, and name the flag, the file and the value instead.
"""

from __future__ import annotations

import os
from argparse import Namespace

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
# Split suggestions, most data for training first.
_CANDIDATE_SPLITS = ("969,30,1", "98,1,1", "95,4,1", "90,5,5", "80,10,10", "50,25,25", "34,33,33")
# Token ids are checked by reading the whole .bin; beyond this size that would slow start-up.
SCAN_LIMIT_BYTES = 4 << 30


class DataError(ValueError):
    """The data flags cannot feed this run; the message names the flag, file and value."""


def drawn_splits(args: Namespace) -> tuple[bool, bool, bool]:
    """(train, valid, test): which splits this trainer draws samples from.

    Validation runs every --eval-interval iterations when --eval-iters > 0; this trainer has
    no test pass, so the test split is never drawn (nor built).
    """
    evaluates = bool(args.eval_iters) and args.train_iters >= args.eval_interval
    return True, evaluates, False


def prefixes(data_path: list[str]) -> list[str]:
    return list(data_path) if len(data_path) == 1 else list(data_path[1::2])


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """megatron-core's own reading of --split (its normalisation and cumulative bounds)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def documents_per_split(num_documents: int, split: str) -> list[int]:
    """Documents in each split, with the rounding megatron-core's builder applies."""
    counts = []
    for bounds in split_matrix(split):
        if bounds is None:
            counts.append(0)
        else:
            begin = int(round(bounds[0] * float(num_documents)))
            end = int(round(bounds[1] * float(num_documents)))
            counts.append(end - begin)
    return counts


def _working_split(num_documents: int, drawn: tuple[bool, ...]) -> str | None:
    for candidate in _CANDIDATE_SPLITS:
        counts = documents_per_split(num_documents, candidate)
        if all(count > 0 for count, used in zip(counts, drawn) if used):
            return candidate
    return None


def _read_index(prefix: str):
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    with open(prefix + ".idx", "rb") as handle:
        header = handle.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:  # checked here: a failed IndexedDataset also fails in __del__
        return None, (
            f"--data-path {prefix}: {prefix}.idx is not a megatron-core index file (its header "
            f"is {header[:9]!r}, expected {_INDEX_HEADER!r}); rebuild it with megatron-core's "
            "IndexedDatasetBuilder (Megatron-LM's tools/preprocess_data.py)"
        )
    try:
        return IndexedDataset(prefix, mmap=True), None
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file fails in many ways
        detail = str(exc) or type(exc).__name__
        return None, (
            f"--data-path {prefix}: {prefix}.idx is not a readable megatron-core index file "
            f"({detail}); rebuild it with megatron-core's IndexedDatasetBuilder "
            "(Megatron-LM's tools/preprocess_data.py)"
        )


def _token_problem(prefix: str, dataset, vocab_size: int) -> str | None:
    """Token ids beyond the vocabulary (NullTokenizer: 0..vocab_size, vocab_size = EOD)."""
    dtype = np.dtype(dataset.index.dtype)
    bin_path = prefix + ".bin"
    size = os.path.getsize(bin_path)
    lengths = dataset.index.sequence_lengths
    pointers = dataset.index.sequence_pointers
    if len(lengths):
        needed = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
        if size < needed:
            return (
                f"--data-path {prefix}: {bin_path} is truncated ({size} bytes, its index "
                f"needs {needed})"
            )
    if size == 0 or size > SCAN_LIMIT_BYTES:
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    chunk = 1 << 24
    high, low = None, None
    for start in range(0, tokens.size, chunk):
        part = tokens[start : start + chunk]
        high = part.max() if high is None else max(high, part.max())
        low = part.min() if low is None else min(low, part.min())
    if high is not None and int(high) > vocab_size:
        return (
            f"--data-path {prefix}: {bin_path} holds token id {int(high)}, but --vocab-size "
            f"{vocab_size} allows ids 0..{vocab_size} ({vocab_size} = end of document); "
            f"set --vocab-size to at least {int(high) + 1}"
        )
    if low is not None and int(low) < 0:
        return f"--data-path {prefix}: {bin_path} holds a negative token id {int(low)}"
    return None


def data_problems(args: Namespace) -> list[str]:
    """Every reason the data flags cannot feed this run (empty: they can)."""
    if args.mock_data or not args.data_path:
        return []
    problems: list[str] = []
    drawn = drawn_splits(args)
    try:
        matrix = split_matrix(args.split)
    except (AssertionError, ValueError, ZeroDivisionError):
        return [f"--split {args.split}: expected up to three non-negative weights, e.g. 969,30,1"]
    for prefix in prefixes(args.data_path):
        dataset, problem = _read_index(prefix)
        if problem is not None:
            problems.append(problem)
            continue
        documents = int(dataset.document_indices.shape[0]) - 1
        counts = documents_per_split(documents, args.split)
        empty = [
            name
            for name, used, count, bounds in zip(SPLIT_NAMES, drawn, counts, matrix)
            if used and (bounds is None or count == 0)
        ]
        if empty:
            shown = ", ".join(f"{n} {c}" for n, c in zip(SPLIT_NAMES, counts))
            working = _working_split(documents, drawn)
            if working is not None:
                advice = f"a split that works: --split {working}"
            else:
                advice = "too few documents for a validation split; use --eval-iters 0"
            if drawn[1] and "valid" in empty:
                advice += " (or --eval-iters 0 to skip validation)"
            problems.append(
                f"--split {args.split} leaves the {' and '.join(empty)} split of --data-path "
                f"{prefix} without documents ({documents} documents: {shown}); {advice}"
            )
        problem = _token_problem(prefix, dataset, args.vocab_size)
        if problem is not None:
            problems.append(problem)
    return problems
