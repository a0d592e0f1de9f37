"""Schedule validator: a schedule the executor would run wrong, or hang on, is rejected here.

Checks, in the order they are reported:
1. shape: stage count, index ranges, one known op per CommGroup (`CommGroup.op`);
2. every (m, t, v) forward and backward runs exactly once per stage;
3. local order: F(m,t,v) after F(m,t-1,v); B(m,t,v) after F(m,t,v) and after B(m,t+1,v); a
   split backward's W(m,t,v) at most once, after B(m,t,v), in the chunk's backward order, and
   none after the chunk's gradient sync point (`grad_sync.grad_sync_points`, the executor's
   rule too: its last backward, or that backward's W), where `main_grad` is read;
4. each compute's receive is posted before it and its send after it, each exactly once; every
   posted op is waited exactly once after it is posted, a receive before the compute that
   reads it, a forward's send before that unit's backward (megatron-core's backward_step wants
   the sent output deallocated), other sends as late as the end of the list;
5. FIFO channel matching pairs every send with a receive of the same payload between adjacent
   virtual stages;
6. a zero-cost run of the network model (`network.py`: non-blocking posts, each rank's ops
   run in posting order on one serial stream, rendezvous) finishes: no deadlock on NCCL or gloo.
Cross-stage data dependencies follow from 4-6: a receive completes only once its send is posted,
and a compute reads a receive only after waiting for it.
"""

from __future__ import annotations

from collections import Counter

from megatron_terapipe.schedules.communication import recv_for, send_for
from megatron_terapipe.schedules.grad_sync import grad_sync_points
from megatron_terapipe.schedules.ir import (
    BACKWARD,
    COMPUTE_KINDS,
    FORWARD,
    KINDS,
    OP_NAMES,
    WEIGHT_GRAD,
    CommGroup,
    Compute,
    Schedule,
    Wait,
)
from megatron_terapipe.schedules.network import describe_deadlock, match_messages, run_network

_MAX_REPORTED = 20


class ScheduleError(ValueError):
    """A schedule breaks a rule; `problems` lists every violation found."""

    def __init__(self, name: str, problems: list[str]):
        self.problems = problems
        shown = problems[:_MAX_REPORTED]
        more = len(problems) - len(shown)
        text = f"schedule {name!r} is invalid:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


def find_problems(schedule: Schedule, forward_only: bool = False) -> list[str]:
    """Every rule violation of `schedule`, empty when it is valid. Stops before the message
    checks if the per-stage lists are already wrong, since those would only echo the cause.

    `forward_only` checks an evaluation schedule: every forward once and no backward at all.
    """
    problems = _shape_problems(schedule)
    if problems:
        return problems
    for rank in range(schedule.num_stages):
        problems += _compute_problems(schedule, rank, forward_only)
        problems += _comm_placement_problems(schedule, rank)
    if problems:
        return problems
    matching = match_messages(schedule)
    if matching.problems:
        return matching.problems
    result = run_network(schedule, matching, lambda rank, c: 0.0, lambda op: 0.0)
    if result.deadlocked:
        return ["deadlock: " + describe_deadlock(schedule, matching, result)]
    return []


def validate_schedule(schedule: Schedule, forward_only: bool = False) -> Schedule:
    """Raise ScheduleError listing the violations; return the schedule when it is valid."""
    problems = find_problems(schedule, forward_only)
    if problems:
        raise ScheduleError(schedule.name, problems)
    return schedule


def _shape_problems(s: Schedule) -> list[str]:
    problems = []
    if len(s.stages) != s.num_stages:
        return [f"{len(s.stages)} stage lists for num_stages={s.num_stages}"]
    limits = (s.num_microbatches, s.num_token_slices, s.num_chunks)
    for rank, actions in enumerate(s.stages):
        for index, action in enumerate(actions):
            where = f"stage {rank} action {index}"
            kinds = KINDS
            if isinstance(action, Compute):
                kinds = COMPUTE_KINDS
                items = [(action.kind, action.microbatch, action.token_slice, action.chunk)]
            elif isinstance(action, Wait):
                if not action.ops:
                    problems.append(f"{where}: empty Wait")
                items = [(op.kind, op.microbatch, op.token_slice, op.chunk) for op in action.ops]
            elif isinstance(action, CommGroup):
                names = [op.op for op in action.ops]
                size_problem = action.size_problem()
                if size_problem:
                    problems.append(f"{where}: {size_problem}")
                if any(n not in OP_NAMES for n in names):
                    problems.append(f"{where}: unknown op in {names}")
                items = [(op.kind, op.microbatch, op.token_slice, op.chunk) for op in action.ops]
            else:
                problems.append(f"{where}: not a Compute or CommGroup: {action!r}")
                continue
            for kind, *index_values in items:
                if kind not in kinds:
                    problems.append(f"{where}: kind {kind!r} is not one of {kinds}")
                names = ("microbatch", "slice", "chunk")
                for value, limit, what in zip(index_values, limits, names):
                    if not 0 <= value < limit:
                        problems.append(f"{where}: {what} {value} outside [0, {limit})")
    return problems


def _compute_problems(s: Schedule, rank: int, forward_only: bool) -> list[str]:
    problems = []
    position: dict[tuple[str, int, int, int], int] = {}
    counts: Counter = Counter()
    for index, action in enumerate(s.stages[rank]):
        if isinstance(action, Compute):
            key = (action.kind, *action.unit)
            counts[key] += 1
            position.setdefault(key, index)
    V, M, S = s.num_chunks, s.num_microbatches, s.num_token_slices
    problems += _weight_grad_problems(s, rank, forward_only)
    for kind in KINDS:
        expected = 0 if forward_only and kind == BACKWARD else 1
        for m in range(M):
            for t in range(S):
                for v in range(V):
                    n = counts[(kind, m, t, v)]
                    if n != expected:
                        name = Compute(kind, m, t, v).format(max(V, 2))
                        problems.append(f"stage {rank}: {name} runs {n} times, expected {expected}")
    if problems:
        return problems

    def at(kind: str, m: int, t: int, v: int) -> int:
        return position[(kind, m, t, v)]

    for m in range(M):
        for t in range(S):
            for v in range(V):
                unit = f"{m}.{t}c{v}"
                if t > 0 and at(FORWARD, m, t, v) < at(FORWARD, m, t - 1, v):
                    problems.append(f"stage {rank}: F{unit} runs before F{m}.{t - 1}c{v}")
                if forward_only:
                    continue
                if at(BACKWARD, m, t, v) < at(FORWARD, m, t, v):
                    problems.append(f"stage {rank}: B{unit} runs before F{unit}")
                if t + 1 < S and at(BACKWARD, m, t, v) < at(BACKWARD, m, t + 1, v):
                    problems.append(
                        f"stage {rank}: B{unit} runs before B{m}.{t + 1}c{v} "
                        "(backwards of a micro-batch must run in reverse slice order)"
                    )
    return problems


def _weight_grad_problems(s: Schedule, rank: int, forward_only: bool) -> list[str]:
    """W(u) at most once and after B(u); per chunk, the backwards add their weight gradients to
    `main_grad` (at W when split, else at B) in backward order, as the unsplit backwards do; no
    W after the chunk's gradient sync point (its last backward, or that backward's W)."""
    problems = []
    backward_at: dict[tuple[int, int, int], int] = {}
    weight_grad_at: dict[tuple[int, int, int], int] = {}
    for index, action in enumerate(s.stages[rank]):
        if isinstance(action, Compute) and action.kind == BACKWARD:
            backward_at.setdefault(action.unit, index)
        elif isinstance(action, Compute) and action.kind == WEIGHT_GRAD:
            weight_grad_at.setdefault(action.unit, index)
    sync_points = grad_sync_points(s.stages[rank])
    seen: set[tuple[int, int, int]] = set()
    for index, action in enumerate(s.stages[rank]):
        if not (isinstance(action, Compute) and action.kind == WEIGHT_GRAD):
            continue
        name = action.format(max(s.num_chunks, 2))
        if forward_only:
            problems.append(f"stage {rank} action {index}: {name} in a forward-only schedule")
            continue
        if action.unit in seen:
            problems.append(f"stage {rank} action {index}: {name} runs more than once")
        seen.add(action.unit)
        backward = backward_at.get(action.unit)
        if backward is None or backward > index:
            problems.append(f"stage {rank} action {index}: {name} runs before its backward")
            continue
        sync_point = sync_points[action.chunk].complete
        if index > sync_point:
            problems.append(
                f"stage {rank} action {index}: {name} runs after chunk {action.chunk}'s gradient "
                f"sync point (action {sync_point}), which reads main_grad"
            )
    if not problems:
        problems += _accumulation_order_problems(s, rank, backward_at, weight_grad_at)
    return problems


def _accumulation_order_problems(s: Schedule, rank: int, backward_at: dict,
                                 weight_grad_at: dict) -> list[str]:
    """Per chunk, each backward's weight gradients reach main_grad (its W, or its B when not
    split) after those of every earlier backward: the unsplit order, so the sums are bitwise
    the unsplit ones."""
    width = max(s.num_chunks, 2)
    latest: dict[int, tuple[int, tuple[int, int, int]]] = {}  # chunk -> (index, unit)
    for unit, backward in sorted(backward_at.items(), key=lambda item: item[1]):
        at = weight_grad_at.get(unit, backward)
        previous = latest.get(unit[2])
        if previous is not None and previous[0] > at:
            kind = WEIGHT_GRAD if unit in weight_grad_at else BACKWARD
            earlier = WEIGHT_GRAD if previous[1] in weight_grad_at else BACKWARD
            return [
                f"stage {rank} action {at}: {Compute(kind, *unit).format(width)} adds to "
                f"main_grad before {Compute(earlier, *previous[1]).format(width)} (action "
                f"{previous[0]}), whose backward ran earlier; weight gradients accumulate in "
                "backward order"
            ]
        latest[unit[2]] = (at, unit)
    return []


def _comm_placement_problems(s: Schedule, rank: int) -> list[str]:
    """Each needed receive precedes its compute, each needed send follows it, nothing extra."""
    P, V = s.num_stages, s.num_chunks
    needed_recv, needed_send = {}, {}
    for index, action in enumerate(s.stages[rank]):
        if isinstance(action, Compute):
            recv = recv_for(action, rank, P, V)
            if recv is not None:
                needed_recv[recv] = index
            send = send_for(action, rank, P, V)
            if send is not None:
                needed_send[send] = index
    posted: Counter = Counter()
    problems = _wait_problems(s, rank, needed_recv)
    for index, action in enumerate(s.stages[rank]):
        if not isinstance(action, CommGroup):
            continue
        for op in action.ops:
            posted[op] += 1
            name = op.format(max(V, 2))
            if op.is_send:
                producer = needed_send.get(op)
                if producer is None:
                    problems.append(f"stage {rank} action {index}: {name} sends nothing needed")
                elif producer > index:
                    problems.append(
                        f"stage {rank} action {index}: {name} is posted before its compute "
                        f"(action {producer})"
                    )
            else:
                consumer = needed_recv.get(op)
                if consumer is None:
                    problems.append(f"stage {rank} action {index}: {name} receives nothing needed")
                elif consumer < index:
                    problems.append(
                        f"stage {rank} action {index}: {name} is posted after its compute "
                        f"(action {consumer})"
                    )
    for op in list(needed_recv) + list(needed_send):
        if posted[op] != 1:
            problems.append(
                f"stage {rank}: {op.format(max(V, 2))} is posted {posted[op]} times, expected once"
            )
    return problems


def _wait_problems(s: Schedule, rank: int, needed_recv: dict) -> list[str]:
    """Every posted op is waited once, after its posting; a receive before its consumer."""
    V = s.num_chunks
    posted_at: dict = {}
    waited_at: dict = {}
    backward_at: dict = {}
    problems = []
    for index, action in enumerate(s.stages[rank]):
        if isinstance(action, Compute) and action.kind == BACKWARD:
            backward_at[action.unit] = index
        elif isinstance(action, CommGroup):
            for op in action.ops:
                posted_at.setdefault(op, index)
        elif isinstance(action, Wait):
            for op in action.ops:
                name = op.format(max(V, 2))
                if op not in posted_at:
                    problems.append(
                        f"stage {rank} action {index}: waits for {name}, which is not posted before"
                    )
                elif op in waited_at:
                    problems.append(
                        f"stage {rank} action {index}: waits for {name} again "
                        f"(already at action {waited_at[op]})"
                    )
                waited_at.setdefault(op, index)
    for op, index in posted_at.items():
        name = op.format(max(V, 2))
        if op not in waited_at:
            problems.append(f"stage {rank} action {index}: {name} is posted but never waited")
        elif not op.is_send and op in needed_recv and waited_at[op] > needed_recv[op]:
            problems.append(
                f"stage {rank} action {waited_at[op]}: {name} is waited after its compute "
                f"(action {needed_recv[op]}) reads it"
            )
        elif op.is_send and op.kind == FORWARD:
            backward = backward_at.get((op.microbatch, op.token_slice, op.chunk))
            if backward is not None and waited_at[op] > backward:
                problems.append(
                    f"stage {rank} action {waited_at[op]}: {name} is waited after the unit's "
                    f"backward (action {backward}), which needs the sent output deallocated"
                )
    return problems
