"""megatron_lm.py: the hooks the upstream patch calls, on a Megatron-LM-like namespace."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_terapipe import megatron_lm
from megatron_terapipe.arguments import TokenPipelineArgumentError


def _ns(**overrides) -> argparse.Namespace:
    parser = megatron_lm.combined_extra_args_provider(None)(argparse.ArgumentParser())
    args = parser.parse_args([])
    values = dict(
        seq_length=128,
        micro_batch_size=2,
        global_batch_size=8,
        data_parallel_size=1,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=2,
        context_parallel_size=1,
        sequence_parallel=False,
        create_attention_mask_in_dataloader=True,
        rank=0,
    )
    values.update(overrides)
    for key, value in values.items():
        setattr(args, key, value)
    return args


def test_combined_provider_chains_the_other_provider():
    def other(parser):
        parser.add_argument("--modelopt-flag", action="store_true")
        return parser

    parser = megatron_lm.combined_extra_args_provider(other)(argparse.ArgumentParser())
    args = parser.parse_args(["--token-pipeline", "--modelopt-flag"])
    assert args.token_pipeline and args.modelopt_flag


def test_validate_args_fills_defaults_and_drops_dataloader_masks():
    args = megatron_lm.validate_args(_ns(token_pipeline=True))
    assert args.token_pipeline_schedule == "terapipe"
    assert args.token_pipeline_slices == "auto"
    assert args.create_attention_mask_in_dataloader is False
    untouched = megatron_lm.validate_args(_ns())
    assert untouched.token_pipeline is False
    assert untouched.create_attention_mask_in_dataloader is True


def test_validate_args_raises_with_flag_names():
    with pytest.raises(TokenPipelineArgumentError, match="--context-parallel-size=2"):
        megatron_lm.validate_args(_ns(token_pipeline=True, context_parallel_size=2))


def test_validate_args_ignores_scripts_without_the_flags():
    args = argparse.Namespace(seq_length=128)
    assert megatron_lm.validate_args(args) is args


def test_schedule_swap():
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving,
    )

    from megatron_terapipe.schedules.executor import TokenPipelineForwardBackward

    megatron_lm.reset()
    stock_args = megatron_lm.validate_args(_ns())
    stock = megatron_lm.get_forward_backward_func(stock_args, pp_size=2, vp_size=None)
    assert stock is forward_backward_pipelining_without_interleaving
    token_args = megatron_lm.validate_args(
        _ns(
            token_pipeline=True,
            token_pipeline_slices=(32, 96),
            token_pipeline_schedule="token-1f1b",
        )
    )
    func = megatron_lm.get_forward_backward_func(token_args)
    assert isinstance(func, TokenPipelineForwardBackward)
    assert func.config.schedule == "token-1f1b"
    assert func.config.resolve_token_slices(128) == (32, 96)
    assert megatron_lm.get_forward_backward_func(token_args) is func  # built once
    assert token_args.token_pipeline_plan["token_slices"] == [32, 96]
    megatron_lm.reset()


def test_layer_spec_swap():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_terapipe.model import PrefixKVAttention

    spec = get_gpt_layer_local_spec()
    assert megatron_lm.layer_spec(spec, _ns()) is spec
    swapped = megatron_lm.layer_spec(spec, _ns(token_pipeline=True))
    assert swapped.submodules.self_attention.submodules.core_attention is PrefixKVAttention
    assert spec.submodules.self_attention.submodules.core_attention is not PrefixKVAttention


def test_wrap_forward_step_sees_the_slice():
    from megatron_terapipe.model import TokenSliceContext, activate

    args = _ns(token_pipeline=True)
    seen = {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        seen.update(seq=args.seq_length, tokens=batch["tokens"].shape[1], model=model)
        return "out", None

    wrapped = megatron_lm.wrap_forward_step(forward_step, args)
    tokens = torch.arange(2 * 128).view(2, 128)
    context = TokenSliceContext((32, 96))
    with activate(context), context.running(0, 0, 1):
        assert wrapped(iter([{"tokens": tokens[:, 32:]}]), "m") == ("out", None)
    assert seen == {"seq": 96, "tokens": 96, "model": "m"}
    assert args.seq_length == 128
    wrapped(iter([{"tokens": tokens}]), "m")  # outside a token step: unchanged
    assert seen["seq"] == 128
