"""Which P2P messages each compute needs, and where they go in a rank's action list.

Generators only decide compute order; `attach_communication` is the one place that turns compute
orders into send/receive groups, so every schedule (and the executor that runs it) shares one rule.

Ring arithmetic (megatron-core's interleaved numbering): chunk ``v`` on rank ``p`` is virtual stage
``v * P + p``; rank 0's previous rank is ``P - 1`` and rank ``P - 1``'s next rank is 0.

The placement rule, and why: the executor's P2P is blocking rendezvous (a group waits until every
op has met its peer), so a placement deadlocks unless matched ops can always meet. Megatron-core's
1F1B pairing ("send what is pending together with the next receive") is deadlock-free for 1F1B
but not for interleaved orders, where megatron-core itself posts receives one step early and
buffers them. The rule here covers both:

1. Run the compute orders once as pure dataflow with unit costs (forward 1, backward 2).
2. Exchange each message at the *latest* moment in [producer end, consumer start] at which
   neither rank is in the middle of a compute (if there is none, at the producer's end).
3. On each rank, put the exchanges of one moment in one CommGroup at that moment, ordered by
   moment (ties by the producer's end time, identical on both ends), then merge groups that
   follow each other with no compute in between.

Both ends of a message sit in groups with the same (moment, producer end) key and every rank posts
its groups in key order, so the smallest key that is blocked could always proceed: no deadlock.
Both ends also post their messages to one peer in key order, so FIFO channel matching pairs the
intended messages, also when P = 2 and activations and gradients share a channel. For
1F1B-type orders this reproduces megatron-core's send_forward_recv_backward /
send_backward_recv_forward pairing exactly; when the unit-cost run is tight, a unit-cost
simulation of the result has no communication stalls.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence

from megatron_terapipe.schedules.ir import (
    BACKWARD,
    FORWARD,
    OP_ORDER,
    RECV_NEXT,
    RECV_PREV,
    SEND_NEXT,
    SEND_PREV,
    Action,
    CommGroup,
    Compute,
    P2POp,
)

_OP_RANK = {name: i for i, name in enumerate(OP_ORDER)}

# Unit costs of the reference run that decides the exchange moments.
REFERENCE_FORWARD_COST = 1.0
REFERENCE_BACKWARD_COST = 2.0


def virtual_stage(rank: int, chunk: int, num_stages: int) -> int:
    return chunk * num_stages + rank


def peer_rank(rank: int, op: str, num_stages: int) -> int:
    """Rank at the other end of `op` on the P2P ring."""
    step = -1 if op in (SEND_PREV, RECV_PREV) else 1
    return (rank + step) % num_stages


def recv_for(compute: Compute, rank: int, num_stages: int, num_chunks: int) -> P2POp | None:
    """The receive `compute` needs before it can run, or None (first/last virtual stage)."""
    vstage = virtual_stage(rank, compute.chunk, num_stages)
    last = num_stages * num_chunks - 1
    if compute.kind == FORWARD and vstage > 0:
        op = RECV_PREV
    elif compute.kind == BACKWARD and vstage < last:
        op = RECV_NEXT
    else:
        return None
    return P2POp(op, compute.kind, compute.microbatch, compute.token_slice, compute.chunk)


def send_for(compute: Compute, rank: int, num_stages: int, num_chunks: int) -> P2POp | None:
    """The send `compute`'s result needs, or None (loss stage forward, first stage backward)."""
    vstage = virtual_stage(rank, compute.chunk, num_stages)
    last = num_stages * num_chunks - 1
    if compute.kind == FORWARD and vstage < last:
        op = SEND_NEXT
    elif compute.kind == BACKWARD and vstage > 0:
        op = SEND_PREV
    else:
        return None
    return P2POp(op, compute.kind, compute.microbatch, compute.token_slice, compute.chunk)


def producer_of(compute: Compute, rank: int, num_stages: int) -> tuple[int, Compute]:
    """(rank, compute) whose output `compute` receives: the adjacent virtual stage's same unit."""
    vstage = virtual_stage(rank, compute.chunk, num_stages)
    source = vstage - 1 if compute.kind == FORWARD else vstage + 1
    chunk, src_rank = divmod(source, num_stages)
    return src_rank, Compute(compute.kind, compute.microbatch, compute.token_slice, chunk)


def canonical_ops(ops: Iterable[P2POp]) -> tuple[P2POp, ...]:
    """Ops in the order the executor posts them (megatron-core's `_batched_p2p_ops`)."""
    return tuple(sorted(ops, key=lambda op: _OP_RANK[op.op]))


class _Reference:
    """Unit-cost dataflow run of compute orders (no communication constraints)."""

    def __init__(self, orders: Sequence[Sequence[Compute]], num_stages: int, num_chunks: int):
        self.P, self.V = num_stages, num_chunks
        self.index = [{c: i for i, c in enumerate(order)} for order in orders]
        for rank, order in enumerate(orders):
            if len(self.index[rank]) != len(order):
                raise ValueError(f"stage {rank}: a compute appears twice in the compute order")
        self.start: list[list[float]] = [[0.0] * len(o) for o in orders]
        self.end: list[list[float]] = [[0.0] * len(o) for o in orders]
        self._run(orders)

    def _run(self, orders: Sequence[Sequence[Compute]]) -> None:
        P, V = self.P, self.V
        done = [[False] * len(o) for o in orders]
        pos, clock = [0] * P, [0.0] * P
        waiters: dict[tuple[int, int], list[int]] = defaultdict(list)
        ready = list(range(P))
        while ready:
            rank = ready.pop()
            order = orders[rank]
            while pos[rank] < len(order):
                compute = order[pos[rank]]
                begin = clock[rank]
                if recv_for(compute, rank, P, V) is not None:
                    src, src_compute = producer_of(compute, rank, P)
                    j = self.index[src].get(src_compute)
                    if j is None:
                        raise ValueError(
                            f"stage {rank} runs {compute.format(V)} but stage {src} never runs "
                            f"{src_compute.format(V)}"
                        )
                    if not done[src][j]:
                        waiters[(src, j)].append(rank)
                        break
                    begin = max(begin, self.end[src][j])
                i = pos[rank]
                cost = REFERENCE_FORWARD_COST
                if compute.kind == BACKWARD:
                    cost = REFERENCE_BACKWARD_COST
                self.start[rank][i], self.end[rank][i] = begin, begin + cost
                clock[rank] = begin + cost
                done[rank][i] = True
                ready.extend(waiters.pop((rank, i), ()))
                pos[rank] += 1
        stuck = [rank for rank in range(P) if pos[rank] < len(orders[rank])]
        if stuck:
            raise ValueError(
                "compute orders wait on each other in a cycle (stages "
                + ", ".join(f"{r} at {orders[r][pos[r]].format(V)}" for r in stuck)
                + ")"
            )

    def _busy_since(self, rank: int, moment: float) -> float | None:
        """Start of the compute running strictly around `moment` on `rank`, else None."""
        i = bisect_left(self.start[rank], moment) - 1
        if i >= 0 and self.end[rank][i] > moment:
            return self.start[rank][i]
        return None

    def exchange_moment(self, a: int, b: int, earliest: float, latest: float) -> float:
        """Latest moment in [earliest, latest] at which neither rank a nor b is mid-compute."""
        moment = latest
        while moment >= earliest:
            around = (self._busy_since(a, moment), self._busy_since(b, moment))
            busy = [s for s in around if s is not None]
            if not busy:
                return moment
            moment = min(busy)
        return earliest


def _same_channel_order(posted: tuple[P2POp, ...], combined: tuple[P2POp, ...]) -> bool:
    """With P = 2 all sends share one channel, as do all receives: their order must not change."""
    return all(
        [op for op in posted if op.is_send == sends]
        == [op for op in combined if op.is_send == sends]
        for sends in (True, False)
    )


def _merge_adjacent(actions: list[Action], rank: int, num_stages: int) -> list[Action]:
    """Merge groups with no compute between them (same blocking, fewer batched calls), unless an
    op name repeats or, on a channel shared by both directions (P = 2), the merged posting order
    would change the order of messages to the peer."""
    merged: list[Action] = []
    for action in actions:
        if isinstance(action, CommGroup) and merged and isinstance(merged[-1], CommGroup):
            before = merged[-1].ops
            if {op.op for op in before}.isdisjoint(op.op for op in action.ops):
                combined = canonical_ops(before + action.ops)
                if num_stages > 2 or _same_channel_order(before + action.ops, combined):
                    merged[-1] = CommGroup(combined)
                    continue
        merged.append(action)
    return merged


def attach_communication(
    compute_orders: Sequence[Sequence[Compute]], num_stages: int, num_chunks: int
) -> tuple[tuple[Action, ...], ...]:
    """Insert CommGroups into each rank's compute order (rule and proof in the module docstring).

    Raises ValueError if the compute orders cannot run at all (a cyclic wait between stages or a
    compute whose input no stage produces).
    """
    P, V = num_stages, num_chunks
    if len(compute_orders) != P:
        raise ValueError(f"{len(compute_orders)} compute orders for num_stages={P}")
    ref = _Reference(compute_orders, P, V)
    exchanges: list[dict[tuple[float, float], list[P2POp]]] = [defaultdict(list) for _ in range(P)]
    for rank, order in enumerate(compute_orders):
        for i, compute in enumerate(order):
            recv = recv_for(compute, rank, P, V)
            if recv is None:
                continue
            src, src_compute = producer_of(compute, rank, P)
            produced = ref.end[src][ref.index[src][src_compute]]
            moment = ref.exchange_moment(rank, src, produced, ref.start[rank][i])
            key = (moment, produced)
            exchanges[rank][key].append(recv)
            exchanges[src][key].append(send_for(src_compute, src, P, V))
    stages = []
    for rank, order in enumerate(compute_orders):
        keys = sorted(exchanges[rank])
        actions: list[Action] = []
        k = 0
        for i, compute in enumerate(order):
            while k < len(keys) and keys[k][0] <= ref.start[rank][i]:
                actions.append(CommGroup(canonical_ops(exchanges[rank][keys[k]])))
                k += 1
            actions.append(compute)
        actions.extend(CommGroup(canonical_ops(exchanges[rank][key])) for key in keys[k:])
        stages.append(tuple(_merge_adjacent(actions, rank, P)))
    return tuple(stages)
