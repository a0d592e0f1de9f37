"""The physical P2P network model shared by the validator and the simulator.

Messages between two ranks travel over one FIFO channel per ordered pair (src, dst): the k-th
send posted on (src, dst) matches the k-th receive posted at dst from src, whatever payload either
side meant (megatron-core's batched isend/irecv carries no tags). With P = 2 a rank's previous and
next rank are the same rank, so activations and gradients share a channel and their order matters.

Blocking semantics (what the executor does): a rank runs its actions in order; a CommGroup posts
all its ops, then blocks until every op has met its peer op (rendezvous: a send completes once the
matching receive is posted and vice versa); computes never block. Because matching depends only on
posting order, it is fixed before anything runs; running then only decides *when*.
"""

from __future__ import annotations

from collections import defaultdict, deque
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
    # rank -> index of the CommGroup it is blocked in (only when the run deadlocked)
    stuck: dict[int, int]

    @property
    def deadlocked(self) -> bool:
        return bool(self.stuck)


def run_blocking(
    schedule: Schedule,
    matching: Matching,
    compute_time: Callable[[int, Compute], float],
    transfer_time: Callable[[P2POp], float],
    eager_sends: bool = False,
) -> RunResult:
    """Run every rank's list under the blocking semantics; times are exact, not sampled.

    A matched op completes ``transfer_time`` after both of its ends are posted; a group ends when
    its last op completes. Event-driven: a rank blocked on a group is woken only when the group it
    waits for is posted, so the cost is linear in the number of actions.

    `eager_sends` models buffered sends instead (small NCCL/gloo messages): a send completes
    ``transfer_time`` after it is posted, whether or not the receive is; the receive completes
    when it is posted and the data has arrived. The executor's contract is rendezvous; eager is
    the optimistic bound.
    """
    stages = schedule.stages
    P = schedule.num_stages
    start: list[list[float | None]] = [[None] * len(a) for a in stages]
    end: list[list[float | None]] = [[None] * len(a) for a in stages]
    pos = [0] * P
    clock = [0.0] * P
    waiters: dict[tuple[int, int], list[int]] = defaultdict(list)
    ready = deque(range(P))
    refs = [
        {
            index: [OpRef(rank, index, op) for op in canonical_ops(action.ops)]
            for index, action in enumerate(actions)
            if isinstance(action, CommGroup)
        }
        for rank, actions in enumerate(stages)
    ]
    while ready:
        rank = ready.popleft()
        actions = stages[rank]
        while pos[rank] < len(actions):
            index = pos[rank]
            action = actions[index]
            if isinstance(action, Compute):
                start[rank][index] = clock[rank]
                clock[rank] += compute_time(rank, action)
                end[rank][index] = clock[rank]
                pos[rank] += 1
                continue
            if start[rank][index] is None:
                start[rank][index] = clock[rank]
                ready.extend(waiters.pop((rank, index), ()))
            finish = clock[rank]
            blocked = False
            for ref in refs[rank][index]:
                if eager_sends and ref.op.is_send:
                    finish = max(finish, start[rank][index] + transfer_time(ref.op))
                    continue
                peer = matching.peer.get(ref)
                peer_posted = None if peer is None else start[peer.rank][peer.action]
                if peer_posted is None:
                    if peer is not None:
                        waiters[(peer.rank, peer.action)].append(rank)
                    blocked = True
                    break
                if eager_sends:
                    arrived = max(start[rank][index], peer_posted + transfer_time(ref.op))
                else:
                    arrived = max(start[rank][index], peer_posted) + transfer_time(ref.op)
                finish = max(finish, arrived)
            if blocked:
                break
            clock[rank] = finish
            end[rank][index] = finish
            pos[rank] += 1
    stuck = {rank: pos[rank] for rank in range(P) if pos[rank] < len(stages[rank])}
    return RunResult(start=start, end=end, stuck=stuck)


def describe_deadlock(schedule: Schedule, matching: Matching, result: RunResult) -> str:
    """Which group each blocked rank sits in and which of its ops still lack their peer."""
    V = schedule.num_chunks
    lines = []
    for rank, index in sorted(result.stuck.items()):
        group = schedule.stages[rank][index]
        missing = []
        for op in canonical_ops(group.ops):
            peer = matching.peer.get(OpRef(rank, index, op))
            if peer is None:
                missing.append(f"{op.format(max(V, 2))} (never matched)")
            elif result.start[peer.rank][peer.action] is None:
                missing.append(
                    f"{op.format(max(V, 2))} (peer stage {peer.rank} has not reached "
                    f"action {peer.action} {schedule.stages[peer.rank][peer.action].format(V)})"
                )
        lines.append(
            f"stage {rank} blocked at action {index} {group.format(V)} waiting for "
            + ", ".join(missing)
        )
    return "; ".join(lines)
