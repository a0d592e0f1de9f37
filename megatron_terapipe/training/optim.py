"""Optimizer and learning-rate schedule: megatron-core's, configured as Megatron-LM does."""

from __future__ import annotations

from argparse import Namespace

import torch


def build_optimizer(args: Namespace, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.params_dtype, torch.float32
    )
    config = OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model)


def build_scheduler(args: Namespace, optimizer):
    """Iteration-based schedule in units of samples, like Megatron-LM's."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_terapipe.training.checkpoint_checks import scheduler_settings

    gbs = args.global_batch_size
    settings = scheduler_settings(args)  # what a resume compares with the checkpoint's
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=settings["max_lr"],
        min_lr=settings["min_lr"],
        lr_warmup_steps=settings["lr_warmup_steps"],
        lr_decay_steps=settings["lr_decay_steps"],
        lr_decay_style=settings["lr_decay_style"],
        start_wd=settings["start_wd"],
        end_wd=settings["start_wd"],
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        # Megatron-LM's flags. Without either, load_checkpoint has already refused a schedule
        # that differs from the checkpoint's, so taking the checkpoint's values changes nothing.
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=(args.lr_wsd_decay_iters * gbs) if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
