"""How much slower a stage computes while the other ranks compute too: the host's share.

Stock 1F1B at M = 1 never computes on two ranks at once (its stages take turns); a token
schedule does so almost all the time. Where every stage has its own device that costs nothing,
but ranks that share a CPU's caches and memory bandwidth (on a VM perhaps a physical core) slow
each other down, and that slowdown lands in the token rows' compute (`t_S/t_1`) as if slicing
had cost it. The probe measures it in the same rounds as the schedules, on the same model: every
rank runs one micro-batch's forward and backward of its own stage, unsliced — once alone (the
ranks take turns, as in stock 1F1B at M = 1), once all at the same time. Per stage,
together / alone is the host's contention factor in this run; it is reported beside the
schedules' figures, never folded into them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from megatron_terapipe.benchmark.host_noise import round_spread, undecided_reason
from megatron_terapipe.timing import synchronized_clock


class StageProbe:
    """One micro-batch's forward and backward through this rank's stage, without P2P."""

    def __init__(self, chunk: Any, batch: dict[str, torch.Tensor], hidden_size: int) -> None:
        from megatron.core.utils import get_attr_wrapped_model

        self.chunk = chunk
        self.batch = batch
        self.pre = get_attr_wrapped_model(chunk, "pre_process")
        self.post = get_attr_wrapped_model(chunk, "post_process")
        self.set_input_tensor = get_attr_wrapped_model(chunk, "set_input_tensor")
        config = get_attr_wrapped_model(chunk, "config")
        dtype = config.pipeline_dtype or config.params_dtype
        device = next(chunk.parameters()).device
        seq, mbs = batch["tokens"].shape[1], batch["tokens"].shape[0]
        gen = torch.Generator().manual_seed(0)
        # What a previous stage would send and a next stage send back: the P2P tensors'
        # shape, dtype and device, made once so that no copy is timed.
        self.hidden = torch.randn(seq, mbs, hidden_size, generator=gen).to(device, dtype)
        self.output_grad = torch.randn(seq, mbs, hidden_size, generator=gen).to(device, dtype)
        self.received: torch.Tensor | None = None  # the last run's input, with its gradient

    def run(self) -> float:
        """Seconds of the forward and backward (gradients accumulate into main_grad)."""
        from megatron_terapipe.training.data import forward_step

        # A fresh leaf per run, as each micro-batch's received tensor is in megatron-core.
        self.received = None if self.pre else self.hidden.detach().requires_grad_()
        start = synchronized_clock()
        self.set_input_tensor(self.received)
        try:
            output, loss_of = forward_step(iter([self.batch]), self.chunk)
            if self.post:
                loss, count, _ = loss_of(output)
                torch.autograd.backward(loss / count.clamp(min=1))
            else:
                torch.autograd.backward(output, self.output_grad)
            return synchronized_clock() - start
        finally:
            self.set_input_tensor(None)


def probe_round(probe: StageProbe, group: Any) -> tuple[float, float]:
    """(seconds alone, seconds together) of this rank's stage: first the ranks take turns, each
    computing while the others wait in a barrier, then all compute at once."""
    rank, size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    alone = 0.0
    for turn in range(size):
        torch.distributed.barrier(group=group)
        if rank == turn:
            alone = probe.run()
    torch.distributed.barrier(group=group)
    together = probe.run()
    torch.distributed.barrier(group=group)
    return alone, together


def contention_factors(alone: Sequence[Sequence[float]], together: Sequence[Sequence[float]]
                       ) -> list[float]:
    """Per stage, median together / median alone (1.0: computing at once costs nothing)."""
    return [statistics.median(t) / statistics.median(a) for a, t in zip(alone, together)]


def contention_note(contention: dict[str, Any], num_microbatches: int) -> str:
    """One line for the printed tables: the factors, how steady the probe was, and what the
    factor means against this M's baseline."""
    shown = "/".join(f"{f:.2f}" for f in contention["factor"])
    rounds = {f"stage {i} {kind}": seconds for kind in ("alone", "together")
              for i, seconds in enumerate(contention[f"{kind}_s"])}
    spread = max(round_spread(seconds) for seconds in rounds.values())
    steady = "" if undecided_reason(rounds) is None else ", NOISY"
    if num_microbatches == 1:
        meaning = ("stock 1F1B at M = 1 never computes on two ranks at once, token schedules "
                   "nearly always: the host's share of t_S/t_1, not slicing's")
    else:
        meaning = (f"at M = {num_microbatches} stock 1F1B's steady state computes on all ranks "
                   "at once too, so its own compute already pays part of this")
    return (f"host: a stage computes {shown}x its time alone while the other ranks compute "
            f"too (probe rounds spread up to {100 * spread:.0f} %{steady}; {meaning})")
