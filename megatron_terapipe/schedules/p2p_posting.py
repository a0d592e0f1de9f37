"""A rank's P2P messages as its schedule posts and waits for them.

A CommGroup posts its one message end as one `torch.distributed.batch_isend_irecv` call with the
slice's shape, and nothing waits there; a Wait blocks until its ops have completed and hands what
arrived to the computes. A sent tensor is kept alive until its send completes, and a forward
output is deallocated (megatron-core's `deallocate_output_tensor`) as soon as its send has:
where a Wait says, or earlier, when a compute finds the send already done
(`free_completed_sends`, which never waits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

from megatron_terapipe.schedules.ir import FORWARD, RECV_PREV, SEND_PREV, CommGroup, P2POp, Wait

# (kind, micro-batch, token slice, chunk) of a message's payload
MessageKey = tuple[str, int, int, int]


@dataclass
class PostedMessage:
    """One message end in flight: its requests and the tensor it reads (send) or fills."""

    op: P2POp
    key: MessageKey
    tensor: torch.Tensor | None  # None once a send has completed and let go of it
    requests: list
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
        self.posted: dict[P2POp, PostedMessage] = {}  # posted, not yet waited
        self.sends_in_flight: deque[PostedMessage] = deque()  # oldest first

    def send_later(self, key: MessageKey, tensor: torch.Tensor) -> None:
        """A compute's result for a peer; the schedule's CommGroup posts it."""
        self.to_send[key] = tensor

    def take(self, key: MessageKey) -> torch.Tensor:
        """A tensor a Wait handed over, for the compute that reads it."""
        return self.received.pop(key)

    def post(self, group: CommGroup) -> None:
        """Post the group's op; nothing waits here."""
        op = group.op
        key = (op.kind, op.microbatch, op.token_slice, op.chunk)
        if op.is_send:
            tensor = self.to_send.pop(key)
        else:
            tensor = torch.empty(
                self.activation_shape(op.token_slice),
                dtype=self.dtype,
                device=self.device,
                requires_grad=(op.op == RECV_PREV and self.receives_need_grad),
            )
        peer = self.prev_rank if op.op in (SEND_PREV, RECV_PREV) else self.next_rank
        post = torch.distributed.isend if op.is_send else torch.distributed.irecv
        p2p_op = torch.distributed.P2POp(post, tensor, peer, self.pp_group)
        with self.timed():
            requests = torch.distributed.batch_isend_irecv([p2p_op])
        message = PostedMessage(op, key, tensor, requests)
        self.posted[op] = message
        if op.is_send:
            self.sends_in_flight.append(message)

    def wait(self, action: Wait) -> None:
        """Block until these ops have completed; hand over what arrived."""
        with self.timed():
            for op in action.ops:
                self._complete(self.posted.pop(op))

    def _complete(self, message: PostedMessage) -> None:
        if not message.completed:
            for request in message.requests:
                request.wait()
            message.completed = True
        if message.op.is_send:
            self._release(message)
        else:
            self.received[message.key] = message.tensor

    def _release(self, message: PostedMessage) -> None:
        """Drop a completed send's tensor: a forward output is deallocated (megatron-core's
        rule), any other is freed once nothing else holds it."""
        if message.tensor is not None and message.key[0] == FORWARD:
            deallocate_output_tensor(message.tensor, self.deallocate_outputs)
        message.tensor = None

    def free_completed_sends(self) -> None:
        """Deallocate forward outputs whose sends have completed (memory only; no waiting)."""
        while self.sends_in_flight:
            message = self.sends_in_flight[0]
            if not message.completed and not all(r.is_completed() for r in message.requests):
                return
            self.sends_in_flight.popleft()
            message.completed = True
            self._release(message)
