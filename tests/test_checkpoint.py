"""Checkpoints: a save interrupted at any point never damages the last good checkpoint.

A "kill" is simulated by making megatron-core's dist-checkpointing save (or the tracker write)
raise part-way, on a real model/optimizer on one gloo rank; the directory is then inspected
and loaded exactly as a restarted job would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_terapipe.training import checkpoint_files

TINY_PP1 = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "4",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]  # fmt: skip


class _Killed(Exception):
    pass


def _weights(model) -> list:
    return [p.detach().clone() for chunk in model for p in chunk.parameters()]


def _interrupted_saves(world: int, root: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing

    from megatron_terapipe.training import checkpointing, initialize, optim
    from megatron_terapipe.training import model as model_module
    from megatron_terapipe.training.args import parse_args, validate_args

    args = validate_args(parse_args(TINY_PP1 + ["--save", root]), world)
    initialize.initialize_distributed(args)
    initialize.set_random_seed(args.seed)
    initialize.init_microbatches(args)
    model = model_module.build_model(args, model_module.transformer_config_from_args(args))
    optimizer = optim.build_optimizer(args, model)
    scheduler = optim.build_scheduler(args, optimizer)
    report: dict = {}
    for chunk in model:  # one (zero-gradient) step, so that Adam's state exists
        chunk.zero_grad_buffer()
    optimizer.step()

    args.consumed_train_samples = 7
    checkpointing.save_checkpoint(args, 1, model, optimizer, scheduler)
    saved = _weights(model)

    # 1. Killed while dist-checkpointing writes iteration 2.
    real_save = dist_checkpointing.save

    def dying_save(state, path, *a, **k):
        with open(os.path.join(path, "__0_0.distcp"), "wb") as handle:
            handle.write(b"half a shard")
        raise _Killed

    dist_checkpointing.save = dying_save
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    try:
        checkpointing.save_checkpoint(args, 2, model, optimizer, scheduler)
    except _Killed:
        pass
    finally:
        dist_checkpointing.save = real_save
    report["after_killed_write"] = sorted(os.listdir(root))
    report["tracker_1"] = checkpoint_files.read_tracker(root)
    report["problem_1"] = checkpoint_files.load_problem(root)

    # 2. Killed after the directory was renamed, before the tracker was replaced.
    real_tracker = checkpointing._write_tracker
    checkpointing._write_tracker = lambda *a: (_ for _ in ()).throw(_Killed())
    try:
        checkpointing.save_checkpoint(args, 3, model, optimizer, scheduler)
    except _Killed:
        pass
    finally:
        checkpointing._write_tracker = real_tracker
    report["after_killed_tracker"] = sorted(os.listdir(root))
    report["tracker_2"] = checkpoint_files.read_tracker(root)

    # A restarted job loads the last good checkpoint (iteration 1) ...
    args.load = root
    args.consumed_train_samples = 0
    iteration, _ = checkpointing.load_checkpoint(args, model, optimizer, scheduler)
    report["loaded_iteration"] = iteration
    report["consumed"] = args.consumed_train_samples
    report["weights_restored"] = all(
        torch.equal(a, b) for a, b in zip(saved, _weights(model), strict=True)
    )
    # ... and its next save cleans up the stale temp directory.
    checkpointing.save_checkpoint(args, 2, model, optimizer, scheduler)
    report["after_good_save"] = sorted(os.listdir(root))
    report["tracker_3"] = checkpoint_files.read_tracker(root)
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # A plain process (megatron-core's checkpoint writer starts worker processes, which a
    # daemonic test worker may not).
    root = str(tmp_path_factory.mktemp("ckpt"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), root],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_killed_write_leaves_last_checkpoint(report):
    assert report["after_killed_write"] == [
        "iter_0000001", "iter_0000002.tmp", "latest_checkpointed_iteration.txt",
    ]  # fmt: skip
    assert report["tracker_1"] == 1
    assert report["problem_1"] is None


def test_killed_before_tracker_keeps_tracker_on_previous(report):
    assert "iter_0000003" in report["after_killed_tracker"]
    assert report["tracker_2"] == 1


def test_restart_loads_last_good_checkpoint(report):
    assert report["loaded_iteration"] == 1
    assert report["consumed"] == 7
    assert report["weights_restored"]


def test_next_save_cleans_stale_temp_dir(report):
    assert "iter_0000002.tmp" not in report["after_good_save"]
    assert "iter_0000002" in report["after_good_save"]
    assert report["tracker_3"] == 2


def test_layout_helpers(tmp_path):
    root = str(tmp_path)
    assert checkpoint_files.read_tracker(root) is None
    assert "holds no checkpoint" in checkpoint_files.load_problem(root)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    assert checkpoint_files.read_tracker(root) is None
    os.makedirs(checkpoint_files.checkpoint_dir(root, 12))
    assert checkpoint_files.available_iterations(root) == []
    (tmp_path / "iter_0000012" / "metadata.json").write_text("{}")
    assert checkpoint_files.available_iterations(root) == [12]
    assert checkpoint_files.load_problem(root, 12) is None
    assert checkpoint_files.iteration_to_load(root, 12) == 12


if __name__ == "__main__":
    import datetime
    import socket

    import torch

    from megatron_terapipe.compat import enable_cpu

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    enable_cpu()
    torch.distributed.init_process_group(
        "gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120)
    )
    out = _interrupted_saves(1, sys.argv[1])
    print(json.dumps(out))
