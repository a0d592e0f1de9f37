"""Log lines and counters in Megatron-LM's format, so existing log parsers keep working.

An iteration line reads like Megatron-LM's (``iteration N/M | consumed samples: ... | elapsed
time per iteration (ms): ... | ... | lm loss: X.XXXXXXE+00 | ...``) with three additions this
project is about: tokens per second, peak memory and the pipeline schedule that ran.
"""

from __future__ import annotations

import math
import resource
from argparse import Namespace
from datetime import datetime

import torch


def num_floating_point_operations(args: Namespace, batch_size: int) -> float:
    """Model FLOPs of one step of `batch_size` sequences (forward + backward).

    Megatron-LM's transformer count: 3 (fwd + 2x bwd) x 2 (multiply-add) x the GEMMs: QKV and
    output projections, causal attention scores and values, MLP, and the logits. In an MoE
    layer (every layer, with --num-experts) a token runs the MLP of its top-k experts and the
    shared expert; the router's GEMM is not counted, as in Megatron-LM.
    """
    s, h, layers = args.seq_length, args.hidden_size, args.num_layers
    kv = args.kv_channels * args.num_query_groups
    q = args.kv_channels * args.num_attention_heads
    gated = 1.5 if args.swiglu else 1.0
    mlp_width = args.ffn_hidden_size
    if getattr(args, "num_experts", None) is not None:
        expert = args.moe_ffn_hidden_size or args.ffn_hidden_size
        mlp_width = expert * args.moe_router_topk + (args.moe_shared_expert_intermediate_size or 0)
    per_token_per_layer = (
        h * (q + 2 * kv)  # QKV projection
        + q * h  # output projection
        + s * q  # QK^T and AV, causal (half of 2 * s * q)
        + 2 * h * mlp_width * gated  # MLP
    )
    per_token = layers * per_token_per_layer + h * args.padded_vocab_size
    return 3 * 2 * batch_size * s * per_token


def moe_track_names(args: Namespace) -> list[str]:
    """The MoE aux losses Megatron-LM's training log tracks for these flags (its rule: one
    name per load-balancing type asked for, and the z-loss whenever its coefficient is set)."""
    types = args.moe_router_load_balancing_type
    types = [types] if isinstance(types, str) else list(types)
    names = []
    if "aux_loss" in types:
        names.append("load_balancing_loss")
    if "seq_aux_loss" in types:
        names.append("seq_load_balancing_loss")
    if "global_aux_loss" in types:
        names.append("global_load_balancing_loss")
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def moe_aux_losses(args: Namespace, iteration: int, writer=None) -> dict[str, float]:
    """This step's MoE aux losses (mean over MoE layers, per micro-batch), as Megatron-LM adds
    them to its iteration line; {} for a dense model. Collective: every rank calls it after
    every step, which also clears megatron-core's tracker for the next one."""
    if getattr(args, "num_experts", None) is None:
        return {}
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from megatron_terapipe.compat.megatron_core import report_moe_losses

    return report_moe_losses(
        moe_track_names(args), args.num_layers, 1.0 / get_num_microbatches(), iteration, writer
    )


def peak_memory_mib() -> float:
    """This rank's peak memory: allocated device memory on GPU, resident set size on CPU."""
    from megatron_terapipe.training.initialize import on_gpu

    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def schedule_name(args: Namespace) -> str:
    if args.token_pipeline:
        return args.token_pipeline_schedule
    if args.pipeline_model_parallel_size == 1:
        return "no-pipelining"
    if args.virtual_pipeline_model_parallel_size:
        return "interleaved-1f1b"
    return "1f1b"


def iteration_line(
    args: Namespace,
    iteration: int,
    elapsed_s: float,
    learning_rate: float,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: float | None,
    skipped: int,
    nan_iterations: int,
) -> str:
    batch = args.global_batch_size
    flops = num_floating_point_operations(args, batch)
    tflops = flops / (elapsed_s * 1e12 * args.world_size) if elapsed_s > 0 else 0.0
    tokens_per_s = batch * args.seq_length / elapsed_s if elapsed_s > 0 else 0.0
    parts = [
        f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
        f" iteration {iteration:8d}/{args.train_iters:8d} |",
        f" consumed samples: {args.consumed_train_samples:12d} |",
        f" elapsed time per iteration (ms): {elapsed_s * 1000.0:.1f} |",
        f" throughput per GPU (TFLOP/s/GPU): {tflops:.3f} |",
        f" tokens per second: {tokens_per_s:.1f} |",
        f" learning rate: {learning_rate:.6E} |",
        f" global batch size: {batch:5d} |",
    ]
    parts += [f" {key}: {value:.6E} |" for key, value in losses.items()]
    parts.append(f" loss scale: {loss_scale:.1f} |")
    if grad_norm is not None:
        parts.append(f" grad norm: {grad_norm:.3f} |")
    parts += [
        f" peak memory (MiB): {peak_memory_mib():.1f} |",
        f" schedule: {schedule_name(args)} |",
        f" number of skipped iterations: {skipped:3d} |",
        f" number of nan iterations: {nan_iterations:3d} |",
    ]
    return "".join(parts)


def validation_block(label: str, losses: dict[str, float]) -> str:
    text = f" validation loss at {label} | "
    for key, value in losses.items():
        text += f"{key} value: {value:.6E} | "
        text += f"{key} PPL: {math.exp(min(20.0, value)):.6E} | "
    rule = "-" * (len(text) + 1)
    return f"{rule}\n{text}\n{rule}"


def tensorboard_writer(args: Namespace):
    """A SummaryWriter on the last rank when --tensorboard-dir is set (None elsewhere)."""
    if not args.tensorboard_dir:
        return None
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
