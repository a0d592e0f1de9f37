"""Which P2P messages each compute needs, and where each rank posts and waits for them.

Generators only decide compute order; `attach_communication` is the one place that turns compute
orders into posted messages (one CommGroup each) and waits, so every schedule (and the executor
that runs it) shares one rule.

Ring arithmetic (megatron-core's interleaved numbering): chunk ``v`` on rank ``p`` is virtual stage
``v * P + p``; rank 0's previous rank is ``P - 1`` and rank ``P - 1``'s next rank is 0.

What the executor does with the result: posting never blocks; each receive is waited right before
the compute that reads it; sends complete while the rank computes and are waited at the end of its
list. What can still go wrong is the order of posting: every rank's P2P calls run one after
another on one stream (NCCL), so a receive posted before a send the peer needs first deadlocks,
and messages pair per channel in posting order (gloo and NCCL alike), so two ends that order one
channel differently swap tensors. The rule:

1. Run the compute orders once as pure dataflow with unit costs (forward 1, backward 2, a split
   backward's weight gradient 1; W actions exchange nothing). Give
   every message the key (end of its producing compute in that run, message id); both ends of
   a message compute the same key.
2. Post every message end as a CommGroup of its own (one P2P call); each send right after the
   compute that produces it.
3. Post each receive as early as the key order allows: right after the last send with a smaller
   key (every rank's posting order is then sorted by key; receives keep their key order). That
   is never after the compute that reads it, and in the unit-cost run never after its data is
   sent, so the transfer overlaps the receiver's compute and no sender's stream waits for a
   receive posted late.
4. Wait for each receive right before its compute; for a forward's send right before that unit's
   backward (megatron-core's backward wants the sent output deallocated; the unit's gradient
   has arrived by then, so the send has completed); for the other sends at the end.

In the unit-cost run itself every message then completes when it is sent, so a schedule's
simulated step keeps the dataflow bubble (the textbook formulas).

Why this cannot deadlock: take the incomplete message with the smallest key. On each rank
everything posted before it has a smaller key, so has completed; its sender posts it after the
producing compute, and every wait before that compute is for data produced (in the unit-cost run)
before that compute started, so with a smaller key; its receiver posts it before waiting for any
larger key (receives are posted in key order, each before its wait). So both ends are posted at
the head of their streams and it completes. Both ends also post each channel's messages in key
order, so FIFO matching pairs the intended messages, also when P = 2 and activations and gradients
share a channel. The validator re-proves both on every schedule it is given (`network.py`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence

from megatron_terapipe.schedules.ir import (
    BACKWARD,
    FORWARD,
    RECV_NEXT,
    RECV_PREV,
    SEND_NEXT,
    SEND_PREV,
    WEIGHT_GRAD,
    Action,
    CommGroup,
    Compute,
    P2POp,
    Wait,
)

# Unit costs of the reference run that decides the exchange moments.
REFERENCE_FORWARD_COST = 1.0
REFERENCE_BACKWARD_COST = 2.0
REFERENCE_WEIGHT_GRAD_COST = 1.0
_REFERENCE_COST = {
    FORWARD: REFERENCE_FORWARD_COST,
    BACKWARD: REFERENCE_BACKWARD_COST,
    WEIGHT_GRAD: REFERENCE_WEIGHT_GRAD_COST,
}


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
                cost = _REFERENCE_COST[compute.kind]
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


def consumer_of(send: P2POp, rank: int, num_stages: int) -> tuple[int, Compute]:
    """(rank, compute) that reads what `send` carries: the adjacent virtual stage's same unit."""
    vstage = virtual_stage(rank, send.chunk, num_stages)
    target = vstage + 1 if send.kind == FORWARD else vstage - 1
    chunk, dst_rank = divmod(target, num_stages)
    return dst_rank, Compute(send.kind, send.microbatch, send.token_slice, chunk)


def _message_key(
    ref: _Reference, producer_rank: int, producer: Compute
) -> tuple[float, int, int, int, int, str]:
    """Sort key of the message `producer` sends; identical at both ends."""
    end = ref.end[producer_rank][ref.index[producer_rank][producer]]
    vstage = virtual_stage(producer_rank, producer.chunk, ref.P)
    return (end, vstage, producer.microbatch, producer.token_slice, 0, producer.kind)


def attach_communication(
    compute_orders: Sequence[Sequence[Compute]], num_stages: int, num_chunks: int
) -> tuple[tuple[Action, ...], ...]:
    """Insert posted groups and waits into each rank's compute order (rule and proof in the module
    docstring).

    Raises ValueError if the compute orders cannot run at all (a cyclic wait between stages or a
    compute whose input no stage produces).
    """
    P, V = num_stages, num_chunks
    if len(compute_orders) != P:
        raise ValueError(f"{len(compute_orders)} compute orders for num_stages={P}")
    ref = _Reference(compute_orders, P, V)
    return tuple(_rank_actions(order, rank, ref) for rank, order in enumerate(compute_orders))


def _rank_actions(order: Sequence[Compute], rank: int, ref: _Reference) -> tuple[Action, ...]:
    P, V = ref.P, ref.V
    n = len(order)
    # slot i: posted just before compute i (slot n: after the last compute)
    slots: list[list[tuple[tuple, P2POp]]] = [[] for _ in range(n + 1)]
    send_keys: list[tuple] = []
    send_slots: list[int] = []
    for i, compute in enumerate(order):
        send = send_for(compute, rank, P, V)
        if send is not None:
            key = _message_key(ref, rank, compute)
            slots[i + 1].append((key, send))
            send_keys.append(key)  # increasing: a rank's computes end in order
            send_slots.append(i + 1)
    waits: dict[int, P2POp] = {}
    for i, compute in enumerate(order):
        recv = recv_for(compute, rank, P, V)
        if recv is None:
            continue
        key = _message_key(ref, *producer_of(compute, rank, P))
        below = bisect_left(send_keys, key)  # sends with a smaller key
        slots[send_slots[below - 1] if below else 0].append((key, recv))
        waits[i] = recv
    actions: list[Action] = []
    waited: set[P2POp] = set()
    for i in range(n + 1):
        actions.extend(CommGroup((op,)) for _, op in sorted(slots[i], key=lambda item: item[0]))
        if i == n:
            break
        if i in waits:
            actions.append(Wait((waits[i],)))
        if order[i].kind == BACKWARD:
            # megatron-core's backward_step wants the unit's forward output deallocated, which
            # is safe once its send completed; the gradient just waited for implies it has.
            forward = Compute(FORWARD, *order[i].unit)
            sent = send_for(forward, rank, P, V)
            if sent is not None:
                actions.append(Wait((sent,)))
                waited.add(sent)
        actions.append(order[i])
    sends = tuple(op for slot in slots for _, op in slot if op.is_send and op not in waited)
    if sends:
        actions.append(Wait(sends))
    return tuple(actions)
