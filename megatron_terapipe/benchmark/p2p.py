"""Latency and bandwidth of one pipeline hop on this machine, by ping-pong.

The simulator charges every activation/gradient message; on gloo over loopback that is not
free, and the per-slice message count grows with S, so it is measured rather than assumed.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_terapipe.benchmark.fit import P2PFit
from megatron_terapipe.timing import synchronized_clock


def calibrate_p2p(
    hidden_size: int, micro_batch_size: int, lengths: tuple[int, ...] = (16, 256, 2048),
    repeats: int = 5,
) -> P2PFit:
    """Fit latency + bytes/rate to half round-trips between ranks 0 and 1 (same on all ranks)."""
    rank = torch.distributed.get_rank()
    points = []
    for length in lengths:
        tensor = torch.zeros(length, micro_batch_size, hidden_size)
        times = []
        for _ in range(repeats):
            torch.distributed.barrier()
            start = synchronized_clock()
            if rank == 0:
                torch.distributed.send(tensor, 1)
                torch.distributed.recv(tensor, 1)
            elif rank == 1:
                torch.distributed.recv(tensor, 0)
                torch.distributed.send(tensor, 0)
            times.append((synchronized_clock() - start) / 2.0)
        points.append((tensor.numel() * tensor.element_size(), float(np.median(times))))
    answer = [points]
    torch.distributed.broadcast_object_list(answer, src=0)
    data = np.asarray(answer[0])
    slope, intercept = np.polyfit(data[:, 0], data[:, 1], 1)
    return P2PFit(latency_s=max(float(intercept), 0.0), seconds_per_byte=max(float(slope), 0.0))
