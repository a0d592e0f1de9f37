"""Token-slice arithmetic shared by the model, the schedules, the planner and the arguments.

Every consumer validates slices through `validate_token_slices` so that a bad slicing is
rejected once, with one message, before any rank computes anything; the flag grammar
(`parse_token_slices`) and the granularity rule (`granularity_problem`) live here for the same
reason. Plain Python: the argument check imports this before torch loads.
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


SLICES_FLAG = "--token-pipeline-slices"


def parse_token_slices(
    value: object, flag: str | None = SLICES_FLAG
) -> str | int | tuple[int, ...]:
    """'auto', a count N, or a tuple of lengths: the grammar of `--token-pipeline-slices`.

    The one parser of that grammar (the argparse type, the argument check and the planner all
    call it), so a value means the same everywhere. None is 'auto' (the flag's default). A
    tuple is lengths (what this returns: parsing twice changes nothing, so `128,` stays one
    slice); a list holds the flag's value or values as a config file or `nargs` gives them.
    Only the form is checked here; whether a count or the lengths fit the sequence is for
    `validate_token_slices` and the argument check.
    """
    if value is None:
        return "auto"
    if isinstance(value, bool):
        raise ValueError(_slices_form_error(flag, value))
    if isinstance(value, int):
        return value
    if isinstance(value, list) and len(value) == 1:
        return parse_token_slices(value[0], flag)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(_slices_form_error(flag, value))
        return tuple(_slice_length(part, flag, value) for part in value)
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if "," in text:
        parts = [part for part in text.split(",") if part.strip()]
        if not parts:
            raise ValueError(_slices_form_error(flag, value))
        return tuple(_slice_length(part, flag, value) for part in parts)
    return _slice_length(text, flag, value)


def _slice_length(part: object, flag: str | None, whole: object) -> int:
    try:
        return int(str(part).strip())
    except ValueError:
        raise ValueError(_slices_form_error(flag, whole)) from None


def _slices_form_error(flag: str | None, value: object) -> str:
    named = f"{flag}={value!r}" if flag else repr(value)
    return (
        f"{named} is not N, 'auto' or a comma-separated list of slice lengths "
        "(e.g. 8, auto, 512,512,1024)"
    )


def granularity_problem(
    granularity: int,
    seq_length: int,
    multiple_of: int = 1,
    flag: str = "granularity",
    seq_flag: str = "seq_length",
    multiple_flag: str = "the tensor-model-parallel size",
) -> str | None:
    """Why slices cannot be multiples of `granularity` tokens (None: they can).

    One rule for the planner's unit, worded with the caller's names: the argument check
    passes Megatron-LM's flags, the planner its parameter names. `multiple_of` is the
    tensor-parallel size under sequence parallelism (each TP rank holds an equal share of a
    slice), 1 otherwise.
    """
    g = int(granularity)
    if g < 1 or seq_length % g:
        valid = [d for d in range(multiple_of, seq_length + 1, multiple_of) if seq_length % d == 0]
        return (
            f"{flag}={granularity} does not divide {seq_flag}={seq_length}; valid values: "
            f"{_shorten(valid)}"
        )
    if g % multiple_of:
        return (
            f"{flag}={granularity} must be a multiple of {multiple_flag} {multiple_of} under "
            "sequence parallelism (every TP rank holds an equal share of a slice)"
        )
    return None


def _shorten(values: Sequence[int], limit: int = 16) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")
