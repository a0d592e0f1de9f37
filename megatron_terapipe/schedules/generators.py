"""Schedule generators: pure functions of (P, M, S, V) that decide each rank's compute order.

Communication is added afterwards by `attach_communication`, so a generator only has to get the
order right. Every schedule here is the same three-phase shape over a rank's forward sequence
and backward sequence: ``W`` warm-up forwards, then one forward and one backward at a time, then
the remaining backwards (`_phased_order`). They differ only in

- the sequences: micro-batches (stock) or (micro-batch, token slice) units, and for virtual
  stages megatron-core's `get_schedule_table` chunk table (`_chunk_table`);
- the warm-up ``W`` per rank: everything (GPipe, TeraPipe), ``P - p - 1`` (1F1B),
  ``2 (P - p - 1) + (V - 1) P`` (interleaved), plus ``S - 1`` for token slices.

Token schedules run a micro-batch's backwards in reverse slice order (slice t's key/value gradient
is complete only once every later slice's backward has run), so their backward sequence is not
the forward one: `_backward_units` reverses slices within each micro-batch.

Any of them can split its backwards (`split_backward_orders`): the input gradient first, sent on
at once, then the unit's weight-gradient GEMMs, so the previous stage starts its backward one
weight-gradient earlier at every hop of the backward chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_terapipe.schedules.communication import attach_communication, virtual_stage
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, WEIGHT_GRAD, Compute, Schedule

Unit = tuple[int, int]  # (micro-batch, token slice)


def _forward_units(num_microbatches: int, num_slices: int) -> list[Unit]:
    return [(m, t) for m in range(num_microbatches) for t in range(num_slices)]


def _backward_units(num_microbatches: int, num_slices: int) -> list[Unit]:
    return [(m, t) for m in range(num_microbatches) for t in reversed(range(num_slices))]


def _phased_order(
    forward: Sequence[Compute], backward: Sequence[Compute], num_warmup: int
) -> list[Compute]:
    """Warm-up forwards, then forward/backward pairs, then the remaining backwards: backward k
    runs right after forward ``num_warmup + k``."""
    total = len(forward)
    warmup = min(num_warmup, total)
    order = list(forward[:warmup])
    for k in range(total - warmup):
        order.append(forward[warmup + k])
        order.append(backward[k])
    order.extend(backward[total - warmup :])
    return order


def _chunk_table(units: Sequence[Unit], num_chunks: int, group_size: int) -> list[tuple[Unit, int]]:
    """megatron-core's `get_schedule_table` over units: per group of `group_size` units, every
    chunk in turn; a short last group is merged the same way megatron-core merges it."""
    table: list[tuple[Unit, int]] = []
    n = len(units)
    for start in range(0, n, group_size):
        end = n if start + group_size >= n else start + group_size
        table.extend((units[i], chunk) for chunk in range(num_chunks) for i in range(start, end))
    return table


def _interleaved_tables(
    fwd: Sequence[Unit], bwd: Sequence[Unit], num_chunks: int, group_size: int
) -> tuple[list[Compute], list[Compute]]:
    """Forward and backward sequences of one rank; backward visits chunks last-to-first."""
    forward = [Compute(FORWARD, m, t, v) for (m, t), v in _chunk_table(fwd, num_chunks, group_size)]
    backward = [
        Compute(BACKWARD, m, t, num_chunks - 1 - v)
        for (m, t), v in _chunk_table(bwd, num_chunks, group_size)
    ]
    return forward, backward


# ---------------------------------------------------------------------------------------------
# Domain checks (ValueError naming the value and what is allowed)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _require_single_slice(name: str, num_token_slices: int) -> None:
    if num_token_slices != 1:
        raise ValueError(
            f"schedule {name!r} is a stock (micro-batch level) schedule and needs "
            f"num_token_slices=1, got {num_token_slices}; use 'terapipe', 'token-1f1b' or "
            "'token-interleaved' for token slices"
        )


def _require_single_chunk(name: str, num_chunks: int) -> None:
    if num_chunks != 1:
        raise ValueError(
            f"schedule {name!r} runs one model chunk per stage, got num_chunks={num_chunks}; "
            "use 'interleaved' or 'token-interleaved' for virtual pipeline stages"
        )


def _require_ring(name: str, num_stages: int, num_chunks: int) -> None:
    """Chunks hand tensors to each other over the P2P ring; a one-rank ring would make a rank
    wait on a send to itself that it only receives later."""
    if num_chunks > 1 and num_stages < 2:
        raise ValueError(
            f"schedule {name!r} with num_chunks={num_chunks} > 1 needs num_stages >= 2 "
            f"(virtual pipeline stages hand tensors between ranks), got num_stages={num_stages}"
        )


def _check_interleaving(
    name: str, num_stages: int, num_microbatches: int, num_chunks: int, always: bool = False
) -> None:
    """megatron-core's interleaved schedule takes micro-batches in groups of P per chunk
    (microbatch_group_size_per_vp_stage = P) and rejects M that is not a multiple of P: a short
    last group would leave a chunk waiting for its own input. `always` applies the rule with one
    chunk too, as megatron-core's interleaved function does."""
    _require_ring(name, num_stages, num_chunks)
    if (num_chunks > 1 or always) and num_microbatches % num_stages:
        raise ValueError(
            f"schedule {name!r} with num_chunks={num_chunks} needs num_microbatches divisible "
            f"by num_stages (megatron-core's microbatch_group_size_per_vp_stage = P), got "
            f"num_microbatches={num_microbatches}, num_stages={num_stages}; valid "
            f"num_microbatches: multiples of {num_stages}"
        )


# ---------------------------------------------------------------------------------------------
# Generators: (P, M, S, V) -> per-rank compute orders


def _gpipe_orders(P: int, M: int, S: int, V: int) -> list[list[Compute]]:
    """All forwards chunk by chunk, then every backward in exactly reverse order: the reverse
    order is what lets a micro-batch's slices run their backwards last-slice-first."""
    forward = [Compute(FORWARD, m, t, v) for v in range(V) for m, t in _forward_units(M, S)]
    backward = [Compute(BACKWARD, c.microbatch, c.token_slice, c.chunk) for c in reversed(forward)]
    return [_phased_order(forward, backward, len(forward)) for _ in range(P)]


def terapipe(P: int, M: int, S: int, V: int = 1) -> Schedule:
    """TeraPipe (Li et al. 2021): GPipe order at token granularity.

    Peak memory holds every unit of the step, but the step is short when M is small because the
    pipeline fills with slices instead of whole micro-batches.
    """
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _require_ring("terapipe", P, V)
    return _make("terapipe", P, M, S, V, _gpipe_orders(P, M, S, V))


def gpipe(P: int, M: int, S: int = 1, V: int = 1) -> Schedule:
    """GPipe: every forward, then every backward in reverse; S = 1 (see `terapipe` for S > 1)."""
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _require_single_slice("gpipe", S)
    _require_ring("gpipe", P, V)
    return _make("gpipe", P, M, S, V, _gpipe_orders(P, M, S, V))


def token_1f1b(P: int, M: int, S: int, V: int = 1) -> Schedule:
    """1F1B over (micro-batch, slice) units with backwards in reverse slice order.

    Rank p warms up with ``P - p - 1 + S - 1`` forwards: the stock ``P - p - 1`` plus ``S - 1``
    because the last stage must run all S forwards of micro-batch 0 before its first backward
    (the backward of the last slice). Activation memory is bounded by the units in flight.
    """
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _require_single_chunk("token-1f1b", V)
    forward = [Compute(FORWARD, m, t) for m, t in _forward_units(M, S)]
    backward = [Compute(BACKWARD, m, t) for m, t in _backward_units(M, S)]
    orders = [_phased_order(forward, backward, P - p - 1 + S - 1) for p in range(P)]
    return _make("token-1f1b", P, M, S, V, orders)


def one_f_one_b(P: int, M: int, S: int = 1, V: int = 1) -> Schedule:
    """megatron-core's non-interleaved 1F1B: warm-up ``min(P - p - 1, M)`` on rank p."""
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _require_single_slice("1f1b", S)
    _require_single_chunk("1f1b", V)
    forward = [Compute(FORWARD, m, 0) for m in range(M)]
    backward = [Compute(BACKWARD, m, 0) for m in range(M)]
    orders = [_phased_order(forward, backward, P - p - 1) for p in range(P)]
    return _make("1f1b", P, M, S, V, orders)


def _interleaved_orders(P: int, M: int, S: int, V: int) -> list[list[Compute]]:
    """megatron-core's interleaved order with every micro-batch replaced by its S slices.

    The chunk table takes groups of P micro-batches (P * S units) per chunk, as megatron-core
    does with microbatch_group_size_per_vp_stage = P. Rank p warms up with
    ``2 (P - p - 1) + (V - 1) P S + S - 1`` forwards: megatron-core's ``2 (P - p - 1) + (V - 1) P``
    in units of slices, plus ``S - 1`` because the last virtual stage must run every forward
    slice of a micro-batch before its first backward (the last slice's). For S = 1 this is
    megatron-core's order exactly. Each unit is 1/S of a micro-batch, so activation memory stays
    at or below stock interleaving's.
    """
    fwd, bwd = _forward_units(M, S), _backward_units(M, S)
    forward, backward = _interleaved_tables(fwd, bwd, V, P * S)
    return [
        _phased_order(forward, backward, 2 * (P - p - 1) + (V - 1) * P * S + S - 1)
        for p in range(P)
    ]


def interleaved(P: int, M: int, S: int = 1, V: int = 2) -> Schedule:
    """megatron-core's interleaved 1F1B (microbatch_group_size_per_vp_stage = P)."""
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _require_single_slice("interleaved", S)
    _check_interleaving("interleaved", P, M, V, always=True)
    return _make("interleaved", P, M, S, V, _interleaved_orders(P, M, 1, V))


def token_interleaved(P: int, M: int, S: int, V: int = 2) -> Schedule:
    """Interleaved 1F1B over (micro-batch, slice) units, backwards in reverse slice order."""
    _check_positive(num_stages=P, num_microbatches=M, num_token_slices=S, num_chunks=V)
    _check_interleaving("token-interleaved", P, M, V)
    return _make("token-interleaved", P, M, S, V, _interleaved_orders(P, M, S, V))


def split_backward_orders(
    orders: Sequence[Sequence[Compute]], num_stages: int
) -> list[list[Compute]]:
    """Follow every backward that sends a gradient (all but the first virtual stage's) with its
    own weight-gradient action W.

    W right after B (after its send is posted, which `attach_communication` places there) moves
    the weight-gradient GEMMs off the path the gradient travels; what W holds past its B is one
    slice's GEMM operands. A chunk's gradient sync then starts after the W of its last backward
    (`grad_sync.grad_sync_points`), once `main_grad` is complete.
    """
    if any(c.kind == WEIGHT_GRAD for order in orders for c in order):
        raise ValueError("split_backward_orders: the compute orders are already split")
    split: list[list[Compute]] = []
    for rank, order in enumerate(orders):
        actions: list[Compute] = []
        for compute in order:
            actions.append(compute)
            sends = virtual_stage(rank, compute.chunk, num_stages) > 0
            if compute.kind == BACKWARD and sends:
                actions.append(Compute(WEIGHT_GRAD, *compute.unit))
        split.append(actions)
    return split


def schedule_from_orders(
    name: str,
    P: int,
    M: int,
    S: int,
    V: int,
    orders: Sequence[Sequence[Compute]],
    split_backward: bool = False,
) -> Schedule:
    """A schedule from per-rank compute orders, communication attached by the one rule;
    `split_backward` first splits the backwards (`split_backward_orders`)."""
    if split_backward:
        orders = split_backward_orders(orders, P)
    return Schedule(
        name=name,
        num_stages=P,
        num_microbatches=M,
        num_token_slices=S,
        num_chunks=V,
        stages=attach_communication(orders, P, V),
        split_backward=split_backward,
    )


def _make(name: str, P: int, M: int, S: int, V: int, orders: list[list[Compute]]) -> Schedule:
    return schedule_from_orders(name, P, M, S, V, orders)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "terapipe": terapipe,
    "token-1f1b": token_1f1b,
    "token-interleaved": token_interleaved,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "gpipe": gpipe,
}
TOKEN_SCHEDULES = ("terapipe", "token-1f1b", "token-interleaved")
STOCK_SCHEDULES = ("1f1b", "interleaved", "gpipe")


def build_schedule(
    name: str,
    num_stages: int,
    num_microbatches: int,
    num_token_slices: int = 1,
    num_chunks: int = 1,
    split_backward: bool = False,
) -> Schedule:
    """Build a named schedule; ValueError names a bad value and what is allowed.
    `split_backward` splits its backwards into B and W actions (`split_backward_orders`)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[name](num_stages, num_microbatches, num_token_slices, num_chunks)
    if not split_backward:
        return schedule
    orders = [schedule.computes(p) for p in range(num_stages)]
    return schedule_from_orders(
        schedule.name,
        num_stages,
        num_microbatches,
        num_token_slices,
        num_chunks,
        orders,
        split_backward=True,
    )
