"""One TransformerConfig path: the trainer's flags and the tests' TinyGPT give the same config.

The trainer (`training.model.transformer_config_from_args`) and the tests' reference models
(`testing.gpt.transformer_config`) both go through `model.transformer_config`; here every
field of megatron-core's TransformerConfig built each way must agree, for dense, MoE and
interleaved settings, so a reference run is configured as the trainer configures its model.
The P2P mode of stock interleaving is pinned to megatron-core's own result in
tests/test_stock_reference.py (interleaved runs at PP 2 and PP 4 equal the unpipelined
reference, and the batched mode at PP 2 does not).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from megatron_terapipe.compat import megatron_core
from megatron_terapipe.model.transformer_config import transformer_config
from megatron_terapipe.testing import gpt
from megatron_terapipe.training import args as targs
from megatron_terapipe.training.model import transformer_config_from_args

SHAPE = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
         "--vocab-size", "128", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--train-iters", "1", "--lr", "0.1", "--mock-data", "--tokenizer-type", "NullTokenizer",
         "--distributed-backend", "gloo", "--no-gradient-accumulation-fusion"]

# (trainer flags, world size, TinyGPT settings, testing.gpt.transformer_config layout)
CASES = {
    "pp4-vp2": (
        ["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "1",
         "--global-batch-size", "4"],
        4, {}, dict(pipeline_parallel=4, virtual_pipeline=2),
    ),
    "pp2-gqa-swiglu-rmsnorm-recompute": (
        ["--pipeline-model-parallel-size", "2", "--group-query-attention",
         "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
         "--ffn-hidden-size", "96", "--recompute-granularity", "full",
         "--recompute-method", "uniform", "--bf16"],
        2,
        dict(num_query_groups=2, ffn_hidden_size=96, recompute_granularity="full",
             recompute_method="uniform", bf16=True,
             config_overrides=dict(swiglu=True, normalization="RMSNorm")),
        dict(pipeline_parallel=2),
    ),
    "tp2-sp-moe": (
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--num-experts", "4",
         "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16", "--disable-bias-linear",
         "--moe-token-dispatcher-type", "alltoall", "--moe-aux-loss-coeff", "0.1"],
        2,
        dict(config_overrides=dict(num_experts=4, moe_ffn_hidden_size=16, add_bias_linear=False,
                                   moe_token_dispatcher_type="alltoall",
                                   moe_aux_loss_coeff=0.1)),
        dict(tensor_parallel=2, sequence_parallel=True),
    ),
}


def _comparable(value):
    # the init methods are partials built afresh in __post_init__: equal by what they call
    if isinstance(value, functools.partial):
        return (value.func, value.args, tuple(sorted(value.keywords.items())))
    return value


def _differences(a, b) -> dict[str, tuple]:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
            if _comparable(getattr(a, f.name)) != _comparable(getattr(b, f.name))}


def _trainer_config(flags: list[str], world_size: int):
    args = targs.validate_args(targs.parse_args(SHAPE + flags), world_size=world_size)
    return transformer_config_from_args(args)


@pytest.mark.parametrize("name", CASES)
def test_trainer_and_test_reference_build_the_same_config(name):
    flags, world_size, model, layout = CASES[name]
    trainer = _trainer_config(flags, world_size)
    reference = gpt.transformer_config(gpt.TinyGPT(num_layers=8, **model), **layout)
    assert not _differences(trainer, reference)
    # ... and the settings took effect (the comparison is not between two defaults)
    changed = _differences(trainer, transformer_config(num_layers=8, hidden_size=32,
                                                       num_attention_heads=4))
    assert changed


def test_the_flags_reach_the_config():
    config = _trainer_config(CASES["pp2-gqa-swiglu-rmsnorm-recompute"][0], 2)
    assert config.num_query_groups == 2 and config.gated_linear_unit
    assert config.activation_func is torch.nn.functional.silu
    assert config.normalization == "RMSNorm" and config.params_dtype == torch.bfloat16
    assert config.recompute_granularity == "full" and config.recompute_num_layers == 1
    moe = _trainer_config(CASES["tp2-sp-moe"][0], 2)
    assert (moe.num_moe_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size) == (4, 2, 16)
    assert moe.sequence_parallel and moe.moe_aux_loss_coeff == 0.1 and not moe.add_bias_linear


def test_p2p_mode_of_stock_interleaving():
    """Overlapped, un-batched P2P with virtual stages (the mode megatron-core supports at every
    pipeline size); megatron-core's batched default without them (it refuses overlap there)."""
    interleaved = _trainer_config(CASES["pp4-vp2"][0], 4)
    assert (interleaved.overlap_p2p_comm, interleaved.batch_p2p_comm) == (True, False)
    plain = transformer_config(num_layers=4, hidden_size=32, num_attention_heads=4,
                               pipeline_model_parallel_size=2)
    assert (plain.overlap_p2p_comm, plain.batch_p2p_comm) == (False, True)
    # outputs are deallocated once sent, unless megatron-core's interleaved schedule would
    # free them while their overlapped send still reads them
    assert plain.deallocate_pipeline_outputs
    assert interleaved.deallocate_pipeline_outputs == (
        megatron_core.INTERLEAVED_SCHEDULE_WAITS_FOR_SEND_BEFORE_DEALLOCATING
    )


def test_moe_settings_reach_the_config_as_flags_or_as_fields():
    """The tests' MoE models name the expert count as megatron-core's field (num_moe_experts)
    and the rest by their Megatron-LM names: those must not be dropped for want of the
    --num-experts flag."""
    from megatron_terapipe.testing.moe import aux_losses, moe_gpt

    config = gpt.transformer_config(moe_gpt(**aux_losses("seq_aux_loss", 0.1, 1e-2)))
    assert config.num_moe_experts == 4 and config.moe_ffn_hidden_size == 16
    assert config.moe_router_load_balancing_type == "seq_aux_loss"
    assert (config.moe_aux_loss_coeff, config.moe_z_loss_coeff) == (0.1, 1e-2)
    assert config.moe_token_dispatcher_type == "alltoall"
    with pytest.raises(ValueError, match="expert count once"):
        transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=4,
                           num_moe_experts=4)
