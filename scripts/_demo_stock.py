"""Body of scripts/demo.sh for now: a tiny GPT trained with stock megatron-core 1F1B on CPU.

Two gloo ranks (PP=2), megatron-core's own schedule, DDP, finalize_model_grads and Adam, logged
in Megatron-LM's format. The data is one fixed, learnable batch (counting sequences), so the
loss visibly falls within a few iterations.
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.gpt import TinyGPT


def counting_batches(model: TinyGPT, micro_batch_size: int, num_microbatches: int, seed: int):
    """Sequences start, start+step, start+2·step, ... (mod vocab); the label is the next one."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    positions = torch.arange(model.seq_length + 1)
    for _ in range(num_microbatches):
        start = torch.randint(0, model.vocab_size, (micro_batch_size, 1), generator=gen)
        step = torch.randint(1, 4, (micro_batch_size, 1), generator=gen)
        seq = (start + step * positions) % model.vocab_size
        shape = (micro_batch_size, model.seq_length)
        batches.append(
            {
                "tokens": seq[:, :-1].contiguous(),
                "labels": seq[:, 1:].contiguous(),
                "loss_mask": torch.ones(shape),
                "position_ids": torch.arange(model.seq_length).expand(shape).contiguous(),
            }
        )
    return batches


def train(rank: int, world_size: int, args: argparse.Namespace) -> list[float]:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_terapipe.testing.gpt import build_gpt_chunks, gpt_forward_step, transformer_config

    model_shape = TinyGPT(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    config = transformer_config(model_shape, pipeline_parallel=world_size)
    (chunk,) = build_gpt_chunks(model_shape, config)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0, params_dtype=torch.float32),
        [model],
    )
    forward_backward = get_forward_backward_func()
    batches = counting_batches(model_shape, args.micro_batch_size, args.num_microbatches, args.seed)
    global_batch = args.micro_batch_size * args.num_microbatches
    last_stage = parallel_state.is_pipeline_last_stage()
    losses = []
    for iteration in range(1, args.train_iters + 1):
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=gpt_forward_step,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=args.num_microbatches,
            seq_length=model_shape.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if last_stage:
            total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
            loss = (total[0] / total[1]).item()
            losses.append(loss)
            print(
                f" iteration {iteration:8d}/{args.train_iters:8d} |"
                f" consumed samples: {iteration * global_batch:12d} |"
                f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
                f" learning rate: {optimizer.param_groups[0]['lr']:.6E} |"
                f" global batch size: {global_batch:5d} |"
                f" lm loss: {loss:.6E} |"
                f" loss scale: 1.0 |"
                f" grad norm: {grad_norm:.3f} |"
                f" number of skipped iterations:   0 |"
                f" number of nan iterations:   0 |",
                flush=True,
            )
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-iters", type=int, default=10)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    world_size = 2
    print(
        f"demo: tiny GPT (4 layers, hidden 64, seq 64) on {world_size} gloo ranks (CPU), "
        f"PP={world_size}, megatron-core 1F1B, Adam lr {args.lr:g}",
        flush=True,
    )
    start = time.perf_counter()
    per_rank = run_distributed(train, world_size, args)
    losses = per_rank[-1]
    print(
        f"demo: lm loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} iterations "
        f"({time.perf_counter() - start:.1f}s including start-up)",
        flush=True,
    )
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
