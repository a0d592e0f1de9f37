"""A rank's P2P messages as its schedule posts and waits for them.

A CommGroup is posted as one `torch.distributed.batch_isend_irecv` call (ops in the order the
network model checked) with per-slice shapes, and nothing waits there; a Wait blocks until the
calls holding its ops have completed and hands what arrived to the computes. A sent tensor is
kept alive until its send completes, and a forward output is deallocated (megatron-core's
`deallocate_output_tensor`) as soon as its send has: where a Wait says, or earlier, when a
compute finds the send already done (`free_completed_sends`, which never waits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

from megatron_terapipe.schedules.communication import canonical_ops
from megatron_terapipe.schedules.ir import FORWARD, RECV_PREV, SEND_PREV, CommGroup, P2POp, Wait

# (kind, micro-batch, token slice, chunk) of a message's payload
MessageKey = tuple[str, int, int, int]


@dataclass
class PostedBatch:
    """One batched P2P call in flight: its requests and the tensors it reads or fills."""

    requests: list = field(default_factory=list)
    sends: list[tuple[MessageKey, torch.Tensor]] = field(default_factory=list)
    recvs: list[tuple[MessageKey, torch.Tensor]] = field(default_factory=list)
    completed: bool = False


class P2PPosting:
    """The rank's messages: tensors computes leave to send, and tensors received for them.

    `activation_shape(token_slice)` is a received tensor's shape; `timed()` wraps each call
    that may take time on the wire (the timeline's "comm")."""

    def __init__(self, *, pp_group: Any, prev_rank: int, next_rank: int, dtype: torch.dtype,
                 device: torch.device, activation_shape: Callable[[int], tuple[int, ...]],
                 receives_need_grad: bool, deallocate_outputs: bool,
                 timed: Callable[[], AbstractContextManager]) -> None:
        self.pp_group = pp_group
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.dtype, self.device = dtype, device
        self.activation_shape = activation_shape
        self.receives_need_grad = receives_need_grad
        self.deallocate_outputs = deallocate_outputs
        self.timed = timed
        self.received: dict[MessageKey, torch.Tensor] = {}  # tensors from a peer, waited for
        self.to_send: dict[MessageKey, torch.Tensor] = {}  # tensors for a peer, not yet posted
        # posted P2P batches: op -> its batch; sends still in flight, oldest first
        self.posted: dict[P2POp, PostedBatch] = {}
        self.sends_in_flight: deque[PostedBatch] = deque()

    def send_later(self, key: MessageKey, tensor: torch.Tensor) -> None:
        """A compute's result for a peer; the schedule's CommGroup posts it."""
        self.to_send[key] = tensor

    def take(self, key: MessageKey) -> torch.Tensor:
        """A tensor a Wait handed over, for the compute that reads it."""
        return self.received.pop(key)

    def post(self, group: CommGroup) -> None:
        """Post the group's ops in one batched call; nothing waits here."""
        batch = PostedBatch()
        p2p_ops = []
        for op in canonical_ops(group.ops):  # the order the network model checked
            key = (op.kind, op.microbatch, op.token_slice, op.chunk)
            if op.is_send:
                tensor = self.to_send.pop(key)
                batch.sends.append((key, tensor))
            else:
                tensor = torch.empty(
                    self.activation_shape(op.token_slice),
                    dtype=self.dtype,
                    device=self.device,
                    requires_grad=(op.op == RECV_PREV and self.receives_need_grad),
                )
                batch.recvs.append((key, tensor))
            peer = self.prev_rank if op.op in (SEND_PREV, RECV_PREV) else self.next_rank
            post = torch.distributed.isend if op.is_send else torch.distributed.irecv
            p2p_ops.append(torch.distributed.P2POp(post, tensor, peer, self.pp_group))
            self.posted[op] = batch
        with self.timed():
            batch.requests = torch.distributed.batch_isend_irecv(p2p_ops) if p2p_ops else []
        if batch.sends:
            self.sends_in_flight.append(batch)

    def wait(self, action: Wait) -> None:
        """Block until the batches holding these ops have completed; hand over what arrived."""
        with self.timed():
            for op in action.ops:
                self._complete(self.posted.pop(op))

    def _complete(self, batch: PostedBatch) -> None:
        if batch.completed:
            return
        for request in batch.requests:
            request.wait()
        batch.completed = True
        for key, tensor in batch.recvs:
            self.received[key] = tensor
        self._release_sends(batch)

    def _release_sends(self, batch: PostedBatch) -> None:
        for key, tensor in batch.sends:
            if key[0] == FORWARD:
                deallocate_output_tensor(tensor, self.deallocate_outputs)
        batch.sends.clear()

    def free_completed_sends(self) -> None:
        """Deallocate forward outputs whose sends have completed (memory only; no waiting)."""
        while self.sends_in_flight:
            batch = self.sends_in_flight[0]
            if not batch.completed and not all(r.is_completed() for r in batch.requests):
                return
            self.sends_in_flight.popleft()
            if not batch.recvs:
                batch.completed = True
            self._release_sends(batch)
