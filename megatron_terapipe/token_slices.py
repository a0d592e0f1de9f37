"""Token-slice arithmetic shared by the model, the schedules, the planner and the arguments.

Every consumer validates slices through `validate_token_slices` so that a bad slicing is
rejected once, with one message, before any rank computes anything.
"""

from __future__ import annotations

from collections.abc import Sequence


def validate_token_slices(
    token_slices: Sequence[int], seq_length: int, multiple_of: int = 1, what: str = "token slices"
) -> tuple[int, ...]:
    """Return `token_slices` as a tuple or raise ValueError naming the slices and the rule broken.

    `multiple_of` is the tensor-parallel size under sequence parallelism (each TP rank holds an
    equal share of every slice) or the planner's granularity.
    """
    slices = tuple(int(length) for length in token_slices)
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not slices:
        raise ValueError(f"{what} must not be empty (seq_length={seq_length})")
    bad = [length for length in slices if length < 1]
    if bad:
        raise ValueError(f"{what} {list(slices)}: every slice must be >= 1 token, got {bad}")
    if sum(slices) != seq_length:
        raise ValueError(
            f"{what} {list(slices)} sum to {sum(slices)}, but must sum to seq_length={seq_length}"
        )
    if multiple_of > 1:
        off = [length for length in slices if length % multiple_of]
        if off:
            raise ValueError(
                f"{what} {list(slices)}: every slice must be a multiple of {multiple_of} "
                f"(tensor-parallel size under sequence parallelism, or granularity); {off} are not"
            )
    return slices


def equal_token_slices(seq_length: int, num_slices: int, multiple_of: int = 1) -> tuple[int, ...]:
    """Split `seq_length` into `num_slices` slices as equal as `multiple_of` allows.

    Longer slices come first: with causal attention later slices carry more context, so
    putting the remainder early evens out per-slice cost a little.
    """
    if num_slices < 1:
        raise ValueError(f"number of token slices must be >= 1, got {num_slices}")
    if multiple_of < 1 or seq_length % multiple_of:
        raise ValueError(
            f"seq_length={seq_length} is not a multiple of {multiple_of} "
            "(tensor-parallel size under sequence parallelism, or granularity)"
        )
    units = seq_length // multiple_of
    if num_slices > units:
        raise ValueError(
            f"cannot cut seq_length={seq_length} into {num_slices} slices of at least "
            f"{multiple_of} token(s): at most {units} slices"
        )
    base, extra = divmod(units, num_slices)
    return tuple((base + (1 if i < extra else 0)) * multiple_of for i in range(num_slices))


def slice_offsets(token_slices: Sequence[int]) -> tuple[int, ...]:
    """Start offset of every slice (the context length it attends to before itself)."""
    offsets, total = [], 0
    for length in token_slices:
        offsets.append(total)
        total += length
    return tuple(offsets)
