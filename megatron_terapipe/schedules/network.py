"""The physical P2P network model shared by the validator and the simulator.

Matching: messages between two ranks travel over one FIFO channel per ordered pair (src, dst): the
k-th send posted on (src, dst) matches the k-th receive posted at dst from src, whatever payload
either side meant (the executor's P2P calls carry no tags). With P = 2 a rank's previous and next
rank are the same rank, so activations and gradients share a channel and their posting order
matters (gloo pairs them per peer in order: a wrong order swaps tensors silently). Matching
depends only on posting order, so it is fixed before anything runs.

Progress (what the executor does, on the strictest backend): a rank runs its actions in order.
Posting a CommGroup (one message end, one P2P call) never blocks the rank; a Wait blocks it until
the ops it names have completed; computes take their time. Each rank's posted ops run one after
another in posting order (NCCL runs every P2P call of a rank on one stream): an op starts once
it is posted and the rank's previous op has completed, and completes once its peer op has
started too (rendezvous), plus the transfer time. Gloo is more permissive (its ops progress
independently), so a schedule that finishes under this model finishes there too: every event
here happens no earlier than there. All conditions are conjunctions of earlier events, so
whether a schedule deadlocks does not depend on the costs; one zero-cost run decides it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_terapipe.schedules.communication import peer_rank, virtual_stage
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
    """Pair sends and receives per channel in posting order and check each pair's payload
    (ValueError for a CommGroup of other than one op: `CommGroup.op`)."""
    P, V = schedule.num_stages, schedule.num_chunks
    sends: dict[tuple[int, int], list[OpRef]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[OpRef]] = defaultdict(list)
    matching = Matching()
    for rank, actions in enumerate(schedule.stages):
        for index, action in enumerate(actions):
            if not isinstance(action, CommGroup):
                continue
            op = action.op
            peer = peer_rank(rank, op.op, P)
            ref = OpRef(rank, index, op)
            if op.is_send:
                sends[(rank, peer)].append(ref)
            else:
                recvs[(peer, rank)].append(ref)
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
    # but a posted op never completed (only when the run deadlocked)
    stuck: dict[int, int]

    @property
    def deadlocked(self) -> bool:
        return bool(self.stuck)


class _Posted:
    """Each rank's posted ops in posting order, and when each starts and completes."""

    def __init__(self, schedule: Schedule, matching: Matching) -> None:
        self.matching = matching
        P = schedule.num_stages
        # per rank: the posting number of each CommGroup action and of each op, and the ops
        self.number_of_action: list[dict[int, int]] = [{} for _ in range(P)]
        self.number_of_op: list[dict[P2POp, int]] = [{} for _ in range(P)]
        self.refs: list[list[OpRef]] = [[] for _ in range(P)]
        for rank, actions in enumerate(schedule.stages):
            for index, action in enumerate(actions):
                if isinstance(action, CommGroup):
                    n = len(self.refs[rank])
                    self.number_of_action[rank][index] = n
                    self.number_of_op[rank][action.op] = n
                    self.refs[rank].append(OpRef(rank, index, action.op))
        self.posted: list[list[float | None]] = [[None] * len(r) for r in self.refs]
        self.done: list[list[float]] = [[] for _ in range(P)]  # completion of ops 0..k-1

    def start(self, rank: int, n: int) -> float | None:
        """When op n of `rank` starts: posted and the rank's previous op completed."""
        posted = self.posted[rank][n]
        if posted is None or len(self.done[rank]) < n:
            return None
        return posted if n == 0 else max(posted, self.done[rank][n - 1])

    def resolve(self, transfer_time: Callable[[P2POp], float], eager_sends: bool) -> bool:
        """Complete every op that can complete now; whether any did."""
        progress, changed = False, True
        while changed:
            changed = False
            for rank in range(len(self.refs)):
                while len(self.done[rank]) < len(self.refs[rank]):
                    n = len(self.done[rank])
                    begin = self.start(rank, n)
                    if begin is None:
                        break
                    finish = self._finish(self.refs[rank][n], begin, transfer_time, eager_sends)
                    if finish is None:
                        break
                    self.done[rank].append(finish)
                    changed = progress = True
        return progress

    def _finish(self, ref: OpRef, begin: float, transfer_time: Callable[[P2POp], float],
                eager_sends: bool) -> float | None:
        """When `ref`, started at `begin`, completes; None while its peer has not started."""
        if eager_sends and ref.op.is_send:
            return begin + transfer_time(ref.op)
        peer = self.matching.peer.get(ref)
        if peer is None:
            return None
        peer_begin = self.start(peer.rank, self.number_of_action[peer.rank][peer.action])
        if peer_begin is None:
            return None
        if eager_sends:
            return max(begin, peer_begin + transfer_time(ref.op))
        return max(begin, peer_begin) + transfer_time(ref.op)


def run_network(
    schedule: Schedule,
    matching: Matching,
    compute_time: Callable[[int, Compute], float],
    transfer_time: Callable[[P2POp], float],
    eager_sends: bool = False,
) -> RunResult:
    """Run every rank's list under the model in the module docstring; times are exact.

    `eager_sends` models buffered sends instead (small NCCL/gloo messages): a send completes
    ``transfer_time`` after it starts, whether or not the receive is posted; the receive
    completes once it has started and the data has arrived. Rendezvous is the contract the
    validator proves; eager is the optimistic bound.
    """
    stages = schedule.stages
    P = schedule.num_stages
    start: list[list[float | None]] = [[None] * len(a) for a in stages]
    end: list[list[float | None]] = [[None] * len(a) for a in stages]
    posted = _Posted(schedule, matching)
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
                    posted.posted[rank][posted.number_of_action[rank][index]] = clock[rank]
                elif isinstance(action, Wait):
                    needed = {posted.number_of_op[rank].get(op) for op in action.ops}
                    if None in needed:
                        raise ValueError(
                            f"stage {rank} action {index} waits for an op it never posted"
                        )
                    last = max(needed, default=-1)
                    if len(posted.done[rank]) <= last:
                        posted.resolve(transfer_time, eager_sends)
                    if len(posted.done[rank]) <= last:
                        break
                    start[rank][index] = clock[rank]
                    clock[rank] = max([clock[rank], *(posted.done[rank][n] for n in needed)])
                end[rank][index] = clock[rank]
                pos[rank] += 1
                changed = True
        if not changed:
            changed = posted.resolve(transfer_time, eager_sends)
    stuck = {rank: pos[rank] for rank in range(P) if pos[rank] < len(stages[rank])}
    for rank in range(P):
        if rank not in stuck and len(posted.done[rank]) < len(posted.refs[rank]):
            stuck[rank] = len(stages[rank])
    return RunResult(start=start, end=end, stuck=stuck)


def describe_deadlock(schedule: Schedule, matching: Matching, result: RunResult) -> str:
    """Where each blocked rank sits, and for the first group it cannot complete, why."""
    V = schedule.num_chunks
    posted = _Posted(schedule, matching)
    for rank, actions in enumerate(schedule.stages):
        for index, action in enumerate(actions):
            if isinstance(action, CommGroup) and result.start[rank][index] is not None:
                posted.posted[rank][posted.number_of_action[rank][index]] = (
                    result.start[rank][index]
                )
    posted.resolve(lambda op: 0.0, False)
    lines = []
    for rank, index in sorted(result.stuck.items()):
        actions = schedule.stages[rank]
        where = (
            f"stage {rank} blocked at action {index} {actions[index].format(V)}"
            if index < len(actions)
            else f"stage {rank} finished its list with posted groups never completed"
        )
        n = len(posted.done[rank])
        if n < len(posted.refs[rank]):
            ref = posted.refs[rank][n]
            where += (
                f"; its group {schedule.stages[rank][ref.action].format(V)} at action "
                f"{ref.action} waits for " + _why_stuck(schedule, posted, ref)
            )
        lines.append(where)
    return "; ".join(lines)


def _why_stuck(schedule: Schedule, posted: _Posted, ref: OpRef) -> str:
    """Why the peer end of `ref` has not started."""
    V = schedule.num_chunks
    name = ref.op.format(max(V, 2))
    peer = posted.matching.peer.get(ref)
    if peer is None:
        return f"{name} (never matched)"
    n = posted.number_of_action[peer.rank][peer.action]
    if posted.posted[peer.rank][n] is None:
        return (
            f"{name} (peer stage {peer.rank} has not reached action {peer.action} "
            f"{schedule.stages[peer.rank][peer.action].format(V)})"
        )
    ahead = posted.refs[peer.rank][len(posted.done[peer.rank])].action
    return (
        f"{name} (peer stage {peer.rank} posted it behind its own unfinished group "
        f"{schedule.stages[peer.rank][ahead].format(V)} at action {ahead})"
    )
