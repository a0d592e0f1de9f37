"""What the steps share: device choice, a single-rank megatron-core set-up, a small GPT."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any


def write_record(path: str, record: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, default=str)


class RowWriter:
    """Appends one JSON line per finished row to a step's result file, flushed and synced at
    once: a step killed at the end of its window (or the whole device call cut off) still
    leaves every row it finished, and `read_rows` reads them back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, default=str) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a RowWriter file; a last line cut off by a kill mid-write is dropped, and a
    missing file has no rows."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def seconds_left(deadline: float | None) -> float:
    """Seconds until `deadline` (epoch seconds, the end of this step's window); infinite
    without one (a step run by hand)."""
    return float("inf") if deadline is None else deadline - time.time()


def inner_timeout(deadline: float | None, share: float = 1.0, default_s: float = 600.0) -> float:
    """A subprocess's timeout inside a step's window: `share` of what is left of it (e.g. 1/2
    for the first of two runs), so that the step's own record is written before the
    orchestrator's kill; `default_s` without a deadline."""
    left = seconds_left(deadline)
    if left == float("inf"):
        return default_s
    return max(1.0, left * share)


def run_group(cmd: list[str], timeout_s: float, **kwargs: Any):
    """`subprocess.run(cmd, capture_output=True, text=True)` in a process group of its own,
    the whole group killed at `timeout_s` (a torchrun's workers too, which a plain timeout
    would leave holding the GPU); returns (CompletedProcess or None on timeout, output)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                stdout, stderr = proc.communicate(timeout=3)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            stdout, stderr = "", ""
        return None, (stdout or "") + (stderr or "")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), stdout + stderr


def step_main(run) -> None:
    """`python -m megatron_terapipe.gpu_check.<step> [--dry-run] --json FILE [--deadline T]
    [--rows FILE]`: runs `run` and writes its record to FILE.

    --deadline: epoch seconds at which the orchestrator kills the step (its window's end);
    inner timeouts are taken from what is left of it. --rows: the file a measuring step
    appends its rows to as it goes."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", required=True)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--rows", default=None)
    ns = parser.parse_args()
    kwargs: dict[str, Any] = {"deadline": ns.deadline}
    if ns.rows:
        kwargs["rows"] = ns.rows
    record = run(dry_run=ns.dry_run, out_dir=ns.out_dir or os.path.dirname(ns.json) or ".",
                 **kwargs)
    write_record(ns.json, record)
    print(json.dumps({"step_status": record.get("status")}), flush=True)
    sys.exit(0)


def judge_losses(record: dict[str, Any], stock: dict, token: dict, rtol: float) -> dict:
    """Steps b and e: each step's loss of the token run within `rtol` of the stock run's."""
    record.update(stock=stock, token=token, loss_rtol=rtol)
    if "error" in stock or "error" in token:
        record["status"] = "error"
        return record
    diffs = [abs(t - s) / abs(s) for s, t in zip(stock["losses"], token["losses"])]
    record["loss_rel_diffs"] = diffs
    record["status"] = "pass" if max(diffs) <= rtol else "fail"
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(dry_run: bool):
    """cuda when there is a GPU and this is not a dry run; the CPU (megatron-core remapped)
    otherwise."""
    import torch

    if not dry_run and torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    from megatron_terapipe.compat import enable_cpu

    enable_cpu(force=True)
    torch.set_num_threads(1)  # toy sizes: threads only contend on a shared CI machine
    return torch.device("cpu")


def single_rank_megatron(seed: int = 1234) -> None:
    """megatron-core model-parallel groups of one rank (gloo: no collective runs on it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class GPTShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    vocab_size: int = 1024
    position_embedding_type: str = "rope"


def build_gpt(shape: GPTShape, dtype, device, token_spec: bool = True, seed: int = 1234):
    """A megatron-core GPTModel (local spec, prefix-KV attention when `token_spec`) on `device`.

    Initialised from `seed` (on the CPU for a CPU model; on the GPU otherwise, which is much
    faster at 13B-layer sizes); comparisons copy weights with load_state_dict.
    """
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_terapipe import token_pipeline_layer_spec
    from megatron_terapipe.model.transformer_config import transformer_config

    torch.manual_seed(seed)
    config = transformer_config(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        use_cpu_initialization=device.type == "cpu",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec()
    if token_spec:
        spec = token_pipeline_layer_spec(spec)
    model = GPTModel(
        config,
        spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        position_embedding_type=shape.position_embedding_type,
    )
    return model.to(device=device, dtype=dtype)


def token_batch(shape: GPTShape, batch: int, device, document_ends=(), seed: int = 5) -> dict:
    """Tokens, labels, a ragged loss mask, position ids; with `document_ends`, EOD tokens there
    and megatron-core's document mask and reset position ids (--reset-attention-mask
    --reset-position-ids)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    size = (batch, shape.seq_length)
    tokens = torch.randint(0, shape.vocab_size - 1, size, generator=gen)
    out = {
        "tokens": tokens,
        "labels": torch.randint(0, shape.vocab_size, size, generator=gen),
        "loss_mask": (torch.rand(size, generator=gen) > 0.2).float(),
        "position_ids": torch.arange(shape.seq_length).expand(size).contiguous(),
    }
    if document_ends:
        from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

        eod = shape.vocab_size - 1
        tokens[:, list(document_ends)] = eod
        rows = [_get_ltor_masks_and_position_ids(t, eod, True, True, False, True) for t in tokens]
        out["attention_mask"] = torch.stack([r[0] for r in rows])
        out["position_ids"] = torch.stack([r[2] for r in rows])
    return {k: v.to(device) for k, v in out.items()}


def environment() -> dict[str, Any]:
    """Versions and the device, for the summary's header."""
    import platform

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception as exc:  # noqa: BLE001 - any failure: report it
        info["megatron_core"] = f"unknown ({exc})"
    return info
