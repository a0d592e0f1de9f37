"""Schedules from text: the notation `Schedule.format` and `str(Schedule)` print, read back.

A user who wants a compute order of their own writes it in the notation the tools print, one
line per rank, and gets the same validation, simulation and execution as a generated schedule:

    stage 0: F0.0 F0.1 B0.1 B0.0
    stage 1: F0.0 F0.1 B0.1 B0.0

Lines holding only computes get their communication from the one placement rule
(`attach_communication`), so a hand-written order never needs P2P written out; text with
groups and waits (what `str(schedule)` prints) is read exactly as written, so
`parse_schedule(str(s)) == s` for every schedule. An optional header line
(`name: P=2 M=1 S=2 V=1 [split-backward]`) gives the name and shape; without it they are
read off the actions.
"""

from __future__ import annotations

import re

from megatron_terapipe.schedules.generators import schedule_from_orders
from megatron_terapipe.schedules.ir import (
    COMPUTE_KINDS,
    KINDS,
    RECV_NEXT,
    RECV_PREV,
    SEND_NEXT,
    SEND_PREV,
    WEIGHT_GRAD,
    Action,
    CommGroup,
    Compute,
    P2POp,
    Schedule,
    Wait,
)

_HEADER = re.compile(r"^(?P<name>[^:]+):\s*P=(?P<P>\d+)\s+M=(?P<M>\d+)\s+S=(?P<S>\d+)\s+"
                     r"V=(?P<V>\d+)(?P<split>\s+split-backward)?\s*$")
_STAGE = re.compile(r"^stage\s+(?P<rank>\d+)\s*:(?P<body>.*)$")
_UNIT = re.compile(r"^(?P<kind>[A-Z])(?P<mb>\d+)\.(?P<slice>\d+)(?:c(?P<chunk>\d+))?$")
_OPS = {">p": SEND_PREV, "<p": RECV_PREV, ">n": SEND_NEXT, "<n": RECV_NEXT}
_TOKEN = re.compile(r"\[[^\]]*\]|\{[^}]*\}|\S+")


class ScheduleTextError(ValueError):
    """Text that is not in the schedule notation; the message names the line and token."""


def _unit(text: str, kinds: tuple[str, ...], where: str) -> tuple[str, int, int, int]:
    match = _UNIT.match(text)
    if match is None or match["kind"] not in kinds:
        raise ScheduleTextError(f"{where}: {text!r} is not a unit; expected "
                                f"<{'|'.join(kinds)}><micro-batch>.<slice>[c<chunk>], e.g. F0.1")
    return (match["kind"], int(match["mb"]), int(match["slice"]), int(match["chunk"] or 0))


def _op(text: str, where: str) -> P2POp:
    op = _OPS.get(text[:2])
    if op is None:
        raise ScheduleTextError(f"{where}: {text!r} is not a message end; expected "
                                f"<direction><peer><unit> with direction > (send) or < (receive)"
                                f" and peer p (previous) or n (next), e.g. >nF0.1")
    return P2POp(op, *_unit(text[2:], KINDS, where))


def _action(token: str, where: str) -> Action:
    if token[0] in "[{":
        closing = "]" if token[0] == "[" else "}"
        if not token.endswith(closing):
            raise ScheduleTextError(f"{where}: {token!r} is not closed by {closing!r}")
        ops = tuple(_op(part, where) for part in token[1:-1].split())
        if not ops:
            raise ScheduleTextError(f"{where}: {token!r} holds no message end")
        return CommGroup(ops) if token[0] == "[" else Wait(ops)
    return Compute(*_unit(token, COMPUTE_KINDS, where))


def parse_schedule(text: str, name: str = "custom") -> Schedule:
    """A Schedule from its text (module docstring); ScheduleTextError names what is wrong.

    The result is not validated here: hand it to `validate_schedule` / `find_problems`, which
    say what a wrong order would break."""
    header = None
    stages: dict[int, tuple[Action, ...]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"line {number}"
        stage = _STAGE.match(line)
        if stage is None:
            match = _HEADER.match(line)
            if match is None or header is not None or stages:
                raise ScheduleTextError(
                    f"{where}: {line!r}: expected 'stage <rank>: <actions>' (or one header line "
                    "'<name>: P=<stages> M=<micro-batches> S=<slices> V=<chunks>' first)")
            header = match
            continue
        rank = int(stage["rank"])
        if rank in stages:
            raise ScheduleTextError(f"{where}: stage {rank} is given twice")
        stages[rank] = tuple(_action(token, f"{where} (stage {rank})")
                             for token in _TOKEN.findall(stage["body"]))
    if not stages:
        raise ScheduleTextError("no 'stage <rank>: ...' line")
    if sorted(stages) != list(range(len(stages))):
        raise ScheduleTextError(f"stages {sorted(stages)} given; expected 0 to {len(stages) - 1}")
    ordered = [stages[rank] for rank in range(len(stages))]
    computes = [a for actions in ordered for a in actions if isinstance(a, Compute)]
    if header is not None:
        name = header["name"].strip()
        shape = tuple(int(header[key]) for key in "PMSV")
        split = header["split"] is not None
        if shape[0] != len(ordered):
            raise ScheduleTextError(f"the header says P={shape[0]} but {len(ordered)} stage "
                                    "lines are given")
    else:
        shape = (len(ordered), 1 + max((c.microbatch for c in computes), default=0),
                 1 + max((c.token_slice for c in computes), default=0),
                 1 + max((c.chunk for c in computes), default=0))
        split = any(c.kind == WEIGHT_GRAD for c in computes)
    P, M, S, V = shape
    if all(isinstance(a, Compute) for actions in ordered for a in actions):
        # Only computes: communication from the placement rule (W actions kept as written).
        schedule = schedule_from_orders(name, P, M, S, V, [list(a) for a in ordered])
        return Schedule(name, P, M, S, V, schedule.stages, split_backward=split)
    return Schedule(name, P, M, S, V, tuple(ordered), split_backward=split)
