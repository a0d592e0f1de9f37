"""Schedule IR: one ordered action list per pipeline rank.

A schedule is data so that the executor (Megatron), the simulator and the validator all read the
same thing; no schedule logic is written twice.

Text notation used by `Schedule.format` (one token per action):

- ``F3.1`` / ``B3.1``: forward / backward of micro-batch 3, token slice 1. With more than one model
  chunk the chunk follows a ``c``: ``F3.1c1``.
- ``W3.1``: the weight-gradient half of ``B3.1`` when the schedule splits backwards (zero-bubble
  style, Qi et al. 2023): ``B3.1`` then computes only the input gradient, which is sent on at
  once, and ``W3.1`` the deferred weight-gradient GEMMs.
- ``[...]``: a CommGroup: one message end is posted and the rank goes on without waiting. The op
  is ``<dir><peer><payload>`` with ``>`` = send, ``<`` = receive, peer ``p`` = previous rank,
  ``n`` = next rank, and the payload in the same form as a compute: ``[>nF0.1]`` sends the
  activation of F0.1 to the next rank, ``[<nB0.1]`` receives the gradient for B0.1 from the
  next rank.
- ``{...}``: a Wait; the rank blocks until these posted ops have completed (``{<pF1.0}`` right
  before ``F1.0``: wait for the data where it is needed). Sends are waited by the Wait that ends
  a rank's list, so they complete while the rank computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

Kind = Literal["F", "B", "W"]

FORWARD = "F"
BACKWARD = "B"
WEIGHT_GRAD = "W"
# What a P2P message carries: an activation (F) or an input gradient (B).
KINDS = (FORWARD, BACKWARD)
COMPUTE_KINDS = (FORWARD, BACKWARD, WEIGHT_GRAD)

SEND_PREV = "send_prev"
RECV_PREV = "recv_prev"
SEND_NEXT = "send_next"
RECV_NEXT = "recv_next"
OP_NAMES = frozenset((SEND_PREV, RECV_PREV, SEND_NEXT, RECV_NEXT))

_OP_SHORT = {SEND_PREV: ">p", RECV_PREV: "<p", SEND_NEXT: ">n", RECV_NEXT: "<n"}


def _unit_text(kind: str, microbatch: int, token_slice: int, chunk: int, num_chunks: int) -> str:
    text = f"{kind}{microbatch}.{token_slice}"
    return f"{text}c{chunk}" if num_chunks > 1 else text


@dataclass(frozen=True)
class Compute:
    """Forward, backward or (split backwards) weight gradient of one (micro-batch, token slice)
    unit on one model chunk of a rank."""

    kind: str
    microbatch: int
    token_slice: int
    chunk: int = 0

    @property
    def unit(self) -> tuple[int, int, int]:
        return (self.microbatch, self.token_slice, self.chunk)

    def format(self, num_chunks: int = 1) -> str:
        return _unit_text(self.kind, self.microbatch, self.token_slice, self.chunk, num_chunks)


@dataclass(frozen=True)
class P2POp:
    """One point-to-point message end: F = an activation, B = an input gradient.

    `chunk` is the chunk on this rank that produced (send) or will consume (recv) the tensor.
    """

    op: str
    kind: str
    microbatch: int
    token_slice: int
    chunk: int

    @property
    def is_send(self) -> bool:
        return self.op in (SEND_PREV, SEND_NEXT)

    def format(self, num_chunks: int = 1) -> str:
        payload = _unit_text(self.kind, self.microbatch, self.token_slice, self.chunk, num_chunks)
        return _OP_SHORT[self.op] + payload


@dataclass(frozen=True)
class CommGroup:
    """Post one P2P message end; posting does not block, a later `Wait` does.

    `ops` holds exactly that one op; the network model (so the validator and the simulator)
    refuses a group of any other size. Every message is posted on its own, where the placement
    rule (`attach_communication`) puts it, so the posting order the deadlock and matching proofs
    reason about is the order of a rank's groups, with no order inside a group to prove.
    """

    ops: tuple[P2POp, ...]

    @property
    def op(self) -> P2POp:
        """The group's one op (ValueError naming `size_problem` for any other group)."""
        problem = self.size_problem()
        if problem:
            raise ValueError(problem)
        return self.ops[0]

    def size_problem(self) -> str | None:
        """Why this group breaks the one-op rule, or None when it keeps it."""
        if len(self.ops) == 1:
            return None
        return f"a CommGroup posts exactly one op, this one holds {len(self.ops)}"

    def format(self, num_chunks: int = 1) -> str:
        return "[" + " ".join(op.format(num_chunks) for op in self.ops) + "]"


@dataclass(frozen=True)
class Wait:
    """Block until each of the posted `ops` has completed."""

    ops: tuple[P2POp, ...]

    def format(self, num_chunks: int = 1) -> str:
        return "{" + " ".join(op.format(num_chunks) for op in self.ops) + "}"


Action = Union[Compute, CommGroup, Wait]


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered action lists plus the shape they were generated for."""

    name: str
    num_stages: int
    num_microbatches: int
    num_token_slices: int
    num_chunks: int
    stages: tuple[tuple[Action, ...], ...]
    # Backwards split into B (input gradient) and W (weight gradient) actions.
    split_backward: bool = False

    def computes(self, stage: int) -> list[Compute]:
        """The compute order of one rank, communication stripped."""
        return [a for a in self.stages[stage] if isinstance(a, Compute)]

    def format(self, stage: int | None = None) -> str:
        """Compact text (notation in the module docstring), one line per rank."""
        ranks = range(self.num_stages) if stage is None else [stage]
        lines = []
        for p in ranks:
            body = " ".join(a.format(self.num_chunks) for a in self.stages[p])
            lines.append(f"stage {p}: {body}")
        return "\n".join(lines)

    def __str__(self) -> str:
        header = (
            f"{self.name}: P={self.num_stages} M={self.num_microbatches} "
            f"S={self.num_token_slices} V={self.num_chunks}"
            + (" split-backward" if self.split_backward else "")
        )
        return header + "\n" + self.format()
