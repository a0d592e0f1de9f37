"""Run a function on N gloo ranks in fresh processes, with a deadline and real tracebacks.

Used by the tests, the benchmarks and the demo. A rank that raises, dies or hangs ends the run:
the error names the rank and carries its traceback, and every process is killed on the way
out, so a broken schedule can never hang a caller.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class DistributedRunError(RuntimeError):
    """A rank failed, died or timed out; the message holds its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    fn: Callable,
    args: tuple,
    kwargs: dict,
    results: mp.Queue,
    threads: int,
    rank_setup: Callable | None,
) -> None:
    try:
        import warnings

        # megatron-core warns at import about every missing GPU-only extra; on CPU that is noise.
        warnings.filterwarnings(
            "ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope|full scope).*"
        )
        import torch

        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
        )
        if rank_setup is not None:
            rank_setup()
        from megatron_terapipe.compat.cpu import enable_cpu

        # The ranks run on gloo and the CPU even on a CUDA host: without force, enable_cpu()
        # would leave megatron-core's CUDA buffers and RNG on the GPU (a half-CUDA run).
        enable_cpu(force=True)
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            value = fn(rank, world_size, *args, **kwargs)
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            # Into the pipe before tearing down: the teardown makes peers blocked in a
            # collective fail too, and their errors must not overtake the real one.
            results.put((rank, False, traceback.format_exc()))
            results.close()
            results.join_thread()
            _teardown()
            return
        _teardown()
        # Plain bytes: torch's queue reductions share tensors through file descriptors that
        # die with this process before the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def _teardown() -> None:
    import torch

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _load(payload: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout_s: float = 240.0,
    threads_per_rank: int = 1,
    startup_s: float = 60.0,
    rank_setup: Callable | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; per-rank values.

    `fn` must be importable (a module-level function) because ranks are spawned processes.
    Process groups get `timeout_s` as their collective timeout, and the whole run the same
    deadline plus `startup_s` for spawning and importing (seconds on a small, busy machine).
    `rank_setup` (importable, no arguments) runs first in each rank, before the CPU remaps.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(
                rank,
                world_size,
                port,
                timeout_s,
                fn,
                args,
                kwargs,
                results,
                threads_per_rank,
                rank_setup,
            ),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s + startup_s
    values: dict[int, Any] = {}
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise DistributedRunError(
                    f"ranks {missing} of {world_size} did not finish within "
                    f"{timeout_s + startup_s:.0f}s (hang or deadlock)"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and r not in values and p.exitcode not in (0, None)
                ]
                if dead:
                    # Give a crashing rank's traceback a moment to arrive before reporting a death.
                    try:
                        rank, ok, value = results.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedRunError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                        ) from None
                else:
                    continue
            if not ok:
                raise DistributedRunError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = _load(value)
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
    return [values[r] for r in range(world_size)]
