"""The trainer's TFLOP/s count is Megatron-LM's: `reporting.num_floating_point_operations`
against Megatron-LM's own `num_floating_point_operations` (megatron.training, installed with
megatron-core 0.19) on the trainer's validated arguments, dense and MoE."""

from __future__ import annotations

import argparse
import os

import pytest

from megatron_terapipe.training import args as targs
from megatron_terapipe.training.config_files import read_config
from megatron_terapipe.training.reporting import num_floating_point_operations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Megatron-LM settings this trainer has no flag for, at Megatron-LM's defaults.
MEGATRON_LM_DEFAULTS = dict(
    moe_layer_freq=1, mtp_num_layers=None, moe_latent_size=None, multi_latent_attention=False,
    attention_output_gate=False, experimental_attention_variant=None, hybrid_layer_pattern=None,
    hybrid_override_pattern=None, is_hybrid_model=False, linear_attention_freq=None,
)  # fmt: skip


def _megatron_lm_count(args: argparse.Namespace, batch_size: int) -> float:
    training = pytest.importorskip("megatron.training.training")
    full = argparse.Namespace(**{**MEGATRON_LM_DEFAULTS, **vars(args)})
    full.group_query_attention = args.num_query_groups != args.num_attention_heads
    return training.num_floating_point_operations(full, batch_size)


@pytest.mark.parametrize("config, extra", [
    ("tiny-cpu.args", []),
    ("tiny-cpu.args", ["--swiglu", "--group-query-attention", "--num-query-groups", "2"]),
    ("tiny-cpu-moe.args", []),
    ("tiny-cpu-moe.args", ["--moe-shared-expert-intermediate-size", "32", "--swiglu"]),
])  # fmt: skip
def test_flops_equal_megatron_lms(config, extra):
    flags = read_config(os.path.join(REPO, "configs", config)) + extra
    args = targs.finalize_args(targs.parse_args(flags), 2)
    ours = num_floating_point_operations(args, 8)
    assert ours == pytest.approx(_megatron_lm_count(args, 8), rel=1e-12)
