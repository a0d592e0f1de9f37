"""The physical P2P network model shared by the validator and the simulator.

Matching: messages between two ranks travel over one FIFO channel per ordered pair (src, dst): the
k-th send posted on (src, dst) matches the k-th receive posted at dst from src, whatever payload
either side meant (megatron-core's batched isend/irecv carries no tags). With P = 2 a rank's
previous and next rank are the same rank, so activations and gradients share a channel and their
posting order matters (gloo pairs them per peer in order: a wrong order swaps tensors silently).
Matching depends only on posting order, so it is fixed before anything runs.

Progress (what the executor does, on the strictest backend): a rank runs its actions in order.
Posting a CommGroup never blocks the rank; a Wait blocks it until the groups it names have
completed; computes take their time. Each rank's posted groups run one after another in posting
order (NCCL runs every P2P call of a rank on one stream, one batched call as one kernel): a
group starts once it is posted and the rank's previous group has completed; one of its ops
completes once its peer op's group has started too (rendezvous), plus the transfer time; the
group completes with its last op. Gloo is more permissive (its ops progress independently), so a
schedule that finishes under this model finishes there too: every event here happens no earlier
than there. All conditions are conjunctions of earlier events, so whether a schedule deadlocks
does not depend on the costs; one zero-cost run decides it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_terapipe.schedules.communication import canonical_ops, peer_rank, virtual_stage
from megatron_terapipe.schedules.ir import (
    BACKWARD,
    FORWARD,
    RECV_NEXT,
    RECV_PREV,
    SEND_NEXT,
    SEND_PREV,
    CommGroup,
    Compute,
    P2POp,
    Schedule,
    Wait,
)

# Which op may carry which tensor: activations go forward along the ring, gradients backward.
_OP_KIND = {SEND_NEXT: FORWARD, RECV_PREV: FORWARD, SEND_PREV: BACKWARD, RECV_NEXT: BACKWARD}


@dataclass(frozen=True)
class OpRef:
    """One op as posted: its rank, the index of its CommGroup in that rank's list, and itself."""

    rank: int
    action: int
    op: P2POp


@dataclass
class Matching:
    """FIFO pairing of every posted send with a posted receive."""

    pairs: list[tuple[OpRef, OpRef]] = field(default_factory=list)  # (send, recv)
    peer: dict[OpRef, OpRef] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def describe(ref: OpRef, num_chunks: int) -> str:
    return f"stage {ref.rank} action {ref.action} {ref.op.format(max(num_chunks, 2))}"


def match_messages(schedule: Schedule) -> Matching:
    """Pair sends and receives per channel in posting order and check each pair's payload."""
    P, V = schedule.num_stages, schedule.num_chunks
    sends: dict[tuple[int, int], list[OpRef]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[OpRef]] = defaultdict(list)
    for rank, actions in enumerate(schedule.stages):
        for index, action in enumerate(actions):
            if not isinstance(action, CommGroup):
                continue
            for op in canonical_ops(action.ops):
                peer = peer_rank(rank, op.op, P)
                ref = OpRef(rank, index, op)
                if op.is_send:
                    sends[(rank, peer)].append(ref)
                else:
                    recvs[(peer, rank)].append(ref)
    matching = Matching()
    for channel in sorted(set(sends) | set(recvs)):
        out, into = sends[channel], recvs[channel]
        for send, recv in zip(out, into):
            matching.pairs.append((send, recv))
            matching.peer[send] = recv
            matching.peer[recv] = send
            problem = _payload_problem(send, recv, P)
            if problem:
                matching.problems.append(
                    f"channel {channel[0]}->{channel[1]}: {describe(send, V)} is received by "
                    f"{describe(recv, V)}: {problem}"
                )
        for ref in out[len(into) :]:
            matching.problems.append(f"{describe(ref, V)} has no matching receive")
        for ref in into[len(out) :]:
            matching.problems.append(f"{describe(ref, V)} has no matching send")
    return matching


def _payload_problem(send: OpRef, recv: OpRef, num_stages: int) -> str | None:
    s, r = send.op, recv.op
    if (s.kind, s.microbatch, s.token_slice) != (r.kind, r.microbatch, r.token_slice):
        return "different payloads"
    if _OP_KIND[s.op] != s.kind or _OP_KIND[r.op] != r.kind:
        return f"{s.kind} tensors cannot travel via {s.op}/{r.op}"
    vs = virtual_stage(send.rank, s.chunk, num_stages)
    vr = virtual_stage(recv.rank, r.chunk, num_stages)
    expected = vr - 1 if s.kind == FORWARD else vr + 1
    if vs != expected:
        return f"sent from virtual stage {vs} but virtual stage {vr} needs it from {expected}"
    return None


@dataclass
class RunResult:
    """Start/end of every action (None where never reached) and the ranks left blocked."""

    start: list[list[float | None]]
    end: list[list[float | None]]
    # rank -> index of the Wait it is blocked in, or len(actions) when its list ran to the end
    # but a posted group never completed (only when the run deadlocked)
    stuck: dict[int, int]

    @property
    def deadlocked(self) -> bool:
        return bool(self.stuck)


class _Batches:
    """Posted groups per rank in posting order, and when each starts and completes."""

    def __init__(self, schedule: Schedule, matching: Matching) -> None:
        self.matching = matching
        P = schedule.num_stages
        # per rank: batch number of each CommGroup action, and each batch's OpRefs
        self.index_of: list[dict[int, int]] = [{} for _ in range(P)]
        self.refs: list[list[list[OpRef]]] = [[] for _ in range(P)]
        self.batch_of_op: list[dict[P2POp, int]] = [{} for _ in range(P)]
        for rank, actions in enumerate(schedule.stages):
            for index, action in enumerate(actions):
                if isinstance(action, CommGroup):
                    b = len(self.refs[rank])
                    self.index_of[rank][index] = b
                    self.refs[rank].append(
                        [OpRef(rank, index, op) for op in canonical_ops(action.ops)]
                    )
                    for op in action.ops:
                        self.batch_of_op[rank][op] = b
        self.posted: list[list[float | None]] = [[None] * len(r) for r in self.refs]
        self.done: list[list[float]] = [[] for _ in range(P)]  # completion of batches 0..k-1

    def start(self, rank: int, b: int) -> float | None:
        """When batch b of `rank` starts: posted and the rank's previous batch completed."""
        posted = self.posted[rank][b]
        if posted is None or len(self.done[rank]) < b:
            return None
        return posted if b == 0 else max(posted, self.done[rank][b - 1])

    def resolve(self, transfer_time: Callable[[P2POp], float], eager_sends: bool) -> bool:
        """Complete every batch that can complete now; whether any did."""
        progress, changed = False, True
        while changed:
            changed = False
            for rank in range(len(self.refs)):
                while len(self.done[rank]) < len(self.refs[rank]):
                    b = len(self.done[rank])
                    begin = self.start(rank, b)
                    if begin is None:
                        break
                    finish = self._finish(rank, b, begin, transfer_time, eager_sends)
                    if finish is None:
                        break
                    self.done[rank].append(finish)
                    changed = progress = True
        return progress

    def _finish(self, rank, b, begin, transfer_time, eager_sends) -> float | None:
        finish = begin
        for ref in self.refs[rank][b]:
            if eager_sends and ref.op.is_send:
                finish = max(finish, begin + transfer_time(ref.op))
                continue
            peer = self.matching.peer.get(ref)
            if peer is None:
                return None
            peer_begin = self.start(peer.rank, self.index_of[peer.rank][peer.action])
            if peer_begin is None:
                return None
            if eager_sends:
                arrived = max(begin, peer_begin + transfer_time(ref.op))
            else:
                arrived = max(begin, peer_begin) + transfer_time(ref.op)
            finish = max(finish, arrived)
        return finish


def run_network(
    schedule: Schedule,
    matching: Matching,
    compute_time: Callable[[int, Compute], float],
    transfer_time: Callable[[P2POp], float],
    eager_sends: bool = False,
) -> RunResult:
    """Run every rank's list under the model in the module docstring; times are exact.

    `eager_sends` models buffered sends instead (small NCCL/gloo messages): a send completes
    ``transfer_time`` after its group starts, whether or not the receive is posted; the receive
    completes once its group has started and the data has arrived. Rendezvous is the contract
    the validator proves; eager is the optimistic bound.
    """
    stages = schedule.stages
    P = schedule.num_stages
    start: list[list[float | None]] = [[None] * len(a) for a in stages]
    end: list[list[float | None]] = [[None] * len(a) for a in stages]
    batches = _Batches(schedule, matching)
    pos = [0] * P
    clock = [0.0] * P
    changed = True
    while changed:
        changed = False
        for rank in range(P):
            actions = stages[rank]
            while pos[rank] < len(actions):
                index = pos[rank]
                action = actions[index]
                if isinstance(action, Compute):
                    start[rank][index] = clock[rank]
                    clock[rank] += compute_time(rank, action)
                elif isinstance(action, CommGroup):
                    start[rank][index] = clock[rank]
                    batches.posted[rank][batches.index_of[rank][index]] = clock[rank]
                elif isinstance(action, Wait):
                    needed = {batches.batch_of_op[rank].get(op) for op in action.ops}
                    if None in needed:
                        raise ValueError(
                            f"stage {rank} action {index} waits for an op it never posted"
                        )
                    last = max(needed, default=-1)
                    if len(batches.done[rank]) <= last:
                        batches.resolve(transfer_time, eager_sends)
                    if len(batches.done[rank]) <= last:
                        break
                    start[rank][index] = clock[rank]
                    clock[rank] = max([clock[rank], *(batches.done[rank][b] for b in needed)])
                end[rank][index] = clock[rank]
                pos[rank] += 1
                changed = True
        if not changed:
            changed = batches.resolve(transfer_time, eager_sends)
    stuck = {rank: pos[rank] for rank in range(P) if pos[rank] < len(stages[rank])}
    for rank in range(P):
        if rank not in stuck and len(batches.done[rank]) < len(batches.refs[rank]):
            stuck[rank] = len(stages[rank])
    return RunResult(start=start, end=end, stuck=stuck)


def describe_deadlock(schedule: Schedule, matching: Matching, result: RunResult) -> str:
    """Where each blocked rank sits, and for the first group it cannot complete, why."""
    V = schedule.num_chunks
    batches = _Batches(schedule, matching)
    for rank, actions in enumerate(schedule.stages):
        for index, action in enumerate(actions):
            if isinstance(action, CommGroup) and result.start[rank][index] is not None:
                batches.posted[rank][batches.index_of[rank][index]] = result.start[rank][index]
    batches.resolve(lambda op: 0.0, False)
    lines = []
    for rank, index in sorted(result.stuck.items()):
        actions = schedule.stages[rank]
        where = (
            f"stage {rank} blocked at action {index} {actions[index].format(V)}"
            if index < len(actions)
            else f"stage {rank} finished its list with posted groups never completed"
        )
        b = len(batches.done[rank])
        group = batches.refs[rank][b] if b < len(batches.refs[rank]) else []
        reasons = []
        for ref in group:
            peer = matching.peer.get(ref)
            name = ref.op.format(max(V, 2))
            if peer is None:
                reasons.append(f"{name} (never matched)")
                continue
            pb = batches.index_of[peer.rank][peer.action]
            if batches.posted[peer.rank][pb] is None:
                reasons.append(
                    f"{name} (peer stage {peer.rank} has not reached action {peer.action} "
                    f"{schedule.stages[peer.rank][peer.action].format(V)})"
                )
            elif batches.start(peer.rank, pb) is None:
                queued = schedule.stages[peer.rank]
                ahead = next(
                    i
                    for i, bb in batches.index_of[peer.rank].items()
                    if bb == len(batches.done[peer.rank])
                )
                reasons.append(
                    f"{name} (peer stage {peer.rank} posted it behind its own unfinished group "
                    f"{queued[ahead].format(V)} at action {ahead})"
                )
        detail = ""
        if group:
            detail = (
                f"; its group {schedule.stages[rank][group[0].action].format(V)} at action "
                f"{group[0].action} waits for " + ", ".join(reasons)
            )
        lines.append(where + detail)
    return "; ".join(lines)
