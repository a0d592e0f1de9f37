"""Data guards: what megatron-core's dataset builder would hang or crash on, found up front.

megatron-core's `GPTDataset` loops forever when a split it builds holds no token
(``_get_num_epochs`` adds one epoch's tokens until the requested samples are covered), a garbage
``.idx`` ends in an assertion deep in the builder, and a token id beyond the vocabulary only
fails inside the embedding on the first batch. These checks read the index files once, before
any rank builds a dataset, and name the flag, the file and the value instead.

The split check counts what megatron-core counts: GPT data is split by *sequence*
(``GPTDataset.numel_low_level_dataset``), which is a document only when every document holds
one sequence (Megatron-LM's ``preprocess_data.py --split-sentences`` writes one per sentence, a
blank input line writes a document with none), and a split is empty for megatron-core when its
sequences hold no token. It checks the splits `built_split_matrix` hands to the builder, the
one decision `data.py` uses too.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
# Split suggestions, most data for training first.
_CANDIDATE_SPLITS = ("969,30,1", "98,1,1", "95,4,1", "90,5,5", "80,10,10", "50,25,25", "34,33,33")
# Token ids are checked by reading the whole .bin; beyond this size that would slow start-up.
SCAN_LIMIT_BYTES = 4 << 30

Bounds = tuple[float, float]


class DataError(ValueError):
    """The data flags cannot feed this run; the message names the flag, file and value."""


def drawn_splits(args: Namespace) -> tuple[bool, bool, bool]:
    """(train, valid, test): which splits this trainer draws samples from.

    Validation runs every --eval-interval iterations when --eval-iters > 0; this trainer has
    no test pass, so the test split is never drawn (nor built).
    """
    evaluates = bool(args.eval_iters) and args.train_iters >= args.eval_interval
    return True, evaluates, False


def built_split_matrix(matrix: list[Bounds | None], args: Namespace) -> list[Bounds | None]:
    """megatron-core's split matrix with the splits this run never draws set to None.

    megatron-core builds (and fills) every split whose bounds are not None, so an undrawn empty
    split would still hang it; the builder and the guard both take this matrix, so the guard
    checks exactly the splits that get built.
    """
    return [bounds if used else None for bounds, used in zip(matrix, drawn_splits(args))]


def prefixes(data_path: list[str]) -> list[str]:
    return list(data_path) if len(data_path) == 1 else list(data_path[1::2])


def split_matrix(split: str) -> list[Bounds | None]:
    """megatron-core's own reading of --split (its normalisation and cumulative bounds)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _ranges(num_elements: int, matrix: list[Bounds | None]) -> list[tuple[int, int] | None]:
    # The rounding of BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    def at(fraction: float) -> int:
        return int(round(fraction * float(num_elements)))

    return [None if bounds is None else (at(bounds[0]), at(bounds[1])) for bounds in matrix]


def documents_per_split(num_documents: int, split: str) -> list[int]:
    """Elements in each split (sequences for GPT data), with megatron-core's rounding."""
    return [0 if r is None else r[1] - r[0] for r in _ranges(num_documents, split_matrix(split))]


def split_contents(
    sequence_lengths: np.ndarray, matrix: list[Bounds | None]
) -> list[tuple[int, int] | None]:
    """(sequences, tokens) of each split megatron-core builds from these sequences; None for a
    split it does not build."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    return [
        None if r is None else (r[1] - r[0], int(ends[r[1]] - ends[r[0]]))
        for r in _ranges(len(lengths), matrix)
    ]


def _working_split(sequence_lengths: np.ndarray, needed: tuple[bool, ...]) -> str | None:
    for candidate in _CANDIDATE_SPLITS:
        contents = split_contents(sequence_lengths, split_matrix(candidate))
        if all(c is not None and c[1] > 0 for c, want in zip(contents, needed) if want):
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


def _emptiness(contents: tuple[int, int] | None) -> str:
    if contents is None or contents[0] == 0:
        return "without documents"
    return f"without tokens (its {contents[0]} sequences are empty)"


def _which(empty: list[tuple[str, tuple[int, int] | None]], prefix: str) -> str:
    """'the valid and test splits of --data-path P without documents'; one reason per split
    when they differ."""
    names = " and ".join(name for name, _ in empty)
    subject = f"the {names} split{'s' if len(empty) > 1 else ''} of --data-path {prefix}"
    reasons = [_emptiness(contents) for _, contents in empty]
    if len(set(reasons)) == 1:
        return f"{subject} {reasons[0]}"
    return f"{subject}: " + ", ".join(f"{name} {r}" for (name, _), r in zip(empty, reasons))


def _split_report(args: Namespace, prefix: str, dataset: Any) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the splits of one prefix."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    # The elements megatron-core's GPT builder splits (its `num_elements`), with their tokens.
    sequences = int(GPTDataset.numel_low_level_dataset(dataset))
    lengths = np.asarray(dataset.sequence_lengths)[:sequences]
    documents = int(dataset.document_indices.shape[0]) - 1
    full = split_matrix(args.split)
    built = built_split_matrix(full, args)
    drawn = drawn_splits(args)
    every = split_contents(lengths, full)
    if sequences == documents:
        counted = f"{documents} documents"
    else:
        counted = f"{documents} documents holding {sequences} sequences, which megatron-core splits"
    shown = ", ".join(f"{n} {0 if c is None else c[0]}" for n, c in zip(SPLIT_NAMES, every))
    counts = f"{counted}: {shown}"

    problems, warnings = [], []
    empty = [
        (name, every[i])
        for i, name in enumerate(SPLIT_NAMES)
        if drawn[i] and (built[i] is None or every[i] is None or every[i][1] == 0)
    ]
    if empty:
        working = _working_split(lengths, drawn)
        if working is not None:
            advice = f"a split that works: --split {working}"
        else:
            advice = "too few documents for a validation split; use --eval-iters 0"
        if drawn[1] and any(name == "valid" for name, _ in empty):
            advice += " (or --eval-iters 0 to skip validation)"
        problems.append(f"--split {args.split} leaves {_which(empty, prefix)} ({counts}); {advice}")
    # Splits with a share of --split that round to nothing, but that this run never draws:
    # harmless here, yet the same flags hang megatron-core's builder in a trainer that builds
    # them (Megatron-LM's builds all three).
    quiet = [
        (name, every[i])
        for i, name in enumerate(SPLIT_NAMES)
        if not drawn[i]
        and every[i] is not None
        and every[i][1] == 0
        and not (name == "valid" and not args.eval_iters)
    ]
    if quiet:
        working = _working_split(lengths, (True, True, True))
        advice = (
            f"--split {working} gives every split documents"
            if working is not None
            else "too few documents to give every split some"
        )
        it, it_is = ("them", "they are") if len(quiet) > 1 else ("it", "it is")
        warnings.append(
            f"--split {args.split} leaves {_which(quiet, prefix)} ({counts}); this run never "
            f"draws from {it}, so {it_is} not built, but a trainer that builds "
            f"{it} (Megatron-LM's) would hang: {advice}"
        )
    return problems, warnings


def check_data(args: Namespace) -> tuple[list[str], list[str]]:
    """(problems, warnings): every reason the data flags cannot feed this run (empty: they
    can), and what would go wrong with the same flags elsewhere."""
    if args.mock_data or not args.data_path:
        return [], []
    problems: list[str] = []
    warnings: list[str] = []
    try:
        split_matrix(args.split)
    except (AssertionError, ValueError, ZeroDivisionError):
        usage = f"--split {args.split}: expected up to three non-negative weights, e.g. 969,30,1"
        return [usage], []
    for prefix in prefixes(args.data_path):
        dataset, problem = _read_index(prefix)
        if problem is not None:
            problems.append(problem)
            continue
        found, noted = _split_report(args, prefix, dataset)
        problems += found
        warnings += noted
        problem = _token_problem(prefix, dataset, args.vocab_size)
        if problem is not None:
            problems.append(problem)
    return problems, warnings


def data_problems(args: Namespace) -> list[str]:
    """Every reason the data flags cannot feed this run (empty: they can)."""
    return check_data(args)[0]
