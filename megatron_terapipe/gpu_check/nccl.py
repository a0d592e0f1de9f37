"""Step b: the trainer's step on a world-size-1 NCCL group, stock schedule vs token pipeline.

One process per schedule runs the product path of scripts/pretrain_gpt.py (training.args ->
initialize -> model -> optim -> loop.train_step): megatron-core DDP, the distributed optimizer,
bf16 (Float16Module, fp32 grad buffers) and per-token loss (`calculate_per_token_loss`, which
hands the token count to finalize_model_grads' all-reduce). A world-size-1 NCCL group still
runs every collective the step makes, so a CPU tensor handed to NCCL fails here. Five steps
of the same data from the same initial weights, the same (SDPA) attention kernel in both
(`--attention-backend flash`): the losses must agree within the bf16 criterion of the CPU
suite. The dry run uses gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from megatron_terapipe.gpu_check.common import (
    free_port,
    inner_timeout,
    judge_losses,
    run_group,
    write_record,
)
from megatron_terapipe.gpu_check.criteria import BF16_LOSS_RTOL

STEPS = 5
GPU_FLAGS = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
             "--seq-length", "1024", "--micro-batch-size", "2", "--global-batch-size", "8"]
DRY_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4"]
COMMON_FLAGS = ["--train-iters", str(STEPS), "--lr", "1e-4", "--bf16",
                "--use-distributed-optimizer", "--mock-data", "--tokenizer-type",
                "NullTokenizer", "--vocab-size", "1000", "--hidden-dropout", "0.0",
                "--attention-dropout", "0.0", "--transformer-impl", "local", "--log-interval",
                "1", "--eval-iters", "0", "--seed", "1234",
                # Stock runs the token pipeline's SDPA core attention too: only the schedule
                # differs between the two runs.
                "--attention-backend", "flash"]
TOKEN_FLAGS = ["--token-pipeline", "--token-pipeline-slices", "4"]


def _batches(args, count: int, seed: int = 11) -> list[dict]:
    """Deterministic micro-batches with a ragged loss mask (per-token weighting matters)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    size = (args.micro_batch_size, args.seq_length)
    return [
        {
            "tokens": torch.randint(0, args.vocab_size, size, generator=gen),
            "labels": torch.randint(0, args.vocab_size, size, generator=gen),
            "loss_mask": (torch.rand(size, generator=gen) > 0.3).float(),
            "position_ids": torch.arange(args.seq_length).expand(size).contiguous(),
        }
        for _ in range(count)
    ]


def run_schedule(flags: list[str]) -> dict[str, Any]:
    """Body of one process: STEPS train steps with the trainer's own pieces."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_terapipe import megatron_lm
    from megatron_terapipe.training import data, initialize, loop, optim
    from megatron_terapipe.training import model as model_module
    from megatron_terapipe.training.args import parse_args, validate_args

    args = validate_args(parse_args(flags), 1)
    initialize.initialize_distributed(args)
    try:
        initialize.set_random_seed(args.seed)
        initialize.init_microbatches(args)
        forward_backward = megatron_lm.get_forward_backward_func(args)
        config = model_module.transformer_config_from_args(args)
        config.calculate_per_token_loss = True
        model = model_module.build_model(args, config)
        optimizer = optim.build_optimizer(args, model)
        scheduler = optim.build_scheduler(args, optimizer)
        config.grad_scale_func = optimizer.scale_loss
        model_module.attach_schedule_hooks(config, model)
        batches = iter(_batches(args, STEPS * get_num_microbatches()))
        losses, grad_norms = [], []
        for _ in range(STEPS):
            reduced, skipped, grad_norm = loop.train_step(
                args, data.forward_step, batches, model, optimizer, scheduler, forward_backward
            )
            losses.append(float(reduced["lm loss"]))
            grad_norms.append(None if grad_norm is None else float(grad_norm))
        return {
            "losses": losses,
            "grad_norms": grad_norms,
            "backend": args.distributed_backend,
            "schedule": "token pipeline" if args.token_pipeline else "stock",
        }
    finally:
        megatron_lm.reset()
        initialize.shutdown()


def _spawn(flags: list[str], json_path: str, timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cmd = [sys.executable, "-m", "megatron_terapipe.gpu_check.nccl", "--one", json_path, *flags]
    done, text = run_group(cmd, timeout_s, env=env)
    if done is None:
        return {"error": f"timed out after {timeout_s:.0f} s",
                "log_tail": text.strip().splitlines()[-12:]}
    if done.returncode != 0 or not os.path.exists(json_path):
        tail = text.strip().splitlines()[-12:]
        return {"error": f"exit status {done.returncode}", "log_tail": tail}
    with open(json_path, encoding="utf-8") as handle:
        return json.load(handle)


def run(dry_run: bool, out_dir: str, deadline: float | None = None) -> dict[str, Any]:
    """Stock then token run, each in its own process; the stock run may take half of what is
    left of the step's window (`deadline`), the token run the rest."""
    backend = "gloo" if dry_run else "nccl"
    flags = (DRY_FLAGS if dry_run else GPU_FLAGS) + COMMON_FLAGS
    flags += ["--distributed-backend", backend]
    stock = _spawn(flags, os.path.join(out_dir, "b_stock.json"), inner_timeout(deadline, 0.5))
    token = _spawn(flags + TOKEN_FLAGS, os.path.join(out_dir, "b_token.json"),
                   inner_timeout(deadline))
    record: dict[str, Any] = {
        "step": "b",
        "title": f"world-size-1 {backend}: DDP + distributed optimizer + per-token loss + bf16,"
        f" {STEPS} steps, stock vs token pipeline (4 slices)",
        "flags": flags,
    }
    return judge_losses(record, stock, token, BF16_LOSS_RTOL)


def _main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        write_record(sys.argv[2], run_schedule(sys.argv[3:]))
        return
    from megatron_terapipe.gpu_check.common import step_main

    step_main(run)


if __name__ == "__main__":
    _main()
