"""megatron_lm.py: the hooks the upstream patch calls, on a Megatron-LM-like namespace.

Unsupported megatron-core features are rejected by flag name at argument time (through the
hook the upstream patch calls) and in check_token_pipeline_support (a TransformerConfig),
from one table."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_terapipe import megatron_lm
from megatron_terapipe.arguments import TokenPipelineArgumentError, token_pipeline_errors
from megatron_terapipe.schedules.support import check_token_pipeline_support
from megatron_terapipe.unsupported_features import UNSUPPORTED_FEATURES


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


def test_validate_args_keeps_document_masks():
    """--reset-attention-mask masks are documents, not plain causality: they must reach the
    model (the executor slices them); dropping them changed the training silently."""
    args = megatron_lm.validate_args(_ns(token_pipeline=True, reset_attention_mask=True))
    assert args.create_attention_mask_in_dataloader is True
    with pytest.raises(TokenPipelineArgumentError) as info:
        megatron_lm.validate_args(
            _ns(token_pipeline=True, reset_attention_mask=True, tensor_model_parallel_size=2)
        )
    assert "--reset-attention-mask" in str(info.value)
    assert "--tensor-model-parallel-size=2" in str(info.value)


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


def test_stock_schedule_gets_upstreams_keywords(monkeypatch):
    """Each Megatron-LM release calls the getter with its megatron-core's keywords
    (core_v0.19.0: schedule_pg_collection=...); they reach megatron-core's unchanged."""
    import megatron.core.pipeline_parallel as pipeline_parallel

    calls = []
    monkeypatch.setattr(
        pipeline_parallel, "get_forward_backward_func", lambda **kw: calls.append(kw) or "stock"
    )
    args = megatron_lm.validate_args(_ns())
    groups = object()
    assert megatron_lm.get_forward_backward_func(args, schedule_pg_collection=groups) == "stock"
    assert megatron_lm.get_forward_backward_func(args) == "stock"
    assert calls == [{"schedule_pg_collection": groups}, {}]


def test_token_schedule_refuses_multi_module_pipelines():
    from megatron.core import process_groups_config

    multi = getattr(process_groups_config, "MultiModuleProcessGroupCollection", None)
    if multi is None:
        pytest.skip("this megatron-core has no multi-module pipelines")
    megatron_lm.reset()
    args = megatron_lm.validate_args(_ns(token_pipeline=True, token_pipeline_slices=4))
    with pytest.raises(ValueError, match="--token-pipeline does not support multi-module"):
        megatron_lm.get_forward_backward_func(args, schedule_pg_collection=multi.__new__(multi))
    megatron_lm.reset()


def test_validate_args_refuses_the_local_attention_backend():
    """Megatron-LM parses --attention-backend into megatron-core's AttnBackend."""
    from megatron.core.transformer.enums import AttnBackend

    for local in (AttnBackend.local, "local"):
        with pytest.raises(TokenPipelineArgumentError) as info:
            megatron_lm.validate_args(
                _ns(token_pipeline=True, token_pipeline_slices=4, attention_backend=local)
            )
        assert any("--attention-backend local" in e for e in info.value.errors)
    megatron_lm.validate_args(_ns(token_pipeline=True, attention_backend=AttnBackend.auto))
    megatron_lm.validate_args(_ns(attention_backend=AttnBackend.local))  # not ours to judge


def _model_config(spec, backend=None):
    """The two attributes a Megatron-LM GPTModelConfig's spec callable is handed and read."""
    from megatron.core.transformer.enums import AttnBackend

    return SimpleNamespace(
        transformer_layer_spec=spec, attention_backend=backend or AttnBackend.auto
    )


def test_gpt_model_config_spec_callable():
    """core_v0.19.0 builds the model from a GPTModelConfig; its layer spec may be a callable of
    (config, vp_stage). Ours resolves a given spec or callable as upstream's builder does.
    (No spec at all resolves through upstream's default_layer_spec: tests/test_patch.py.)"""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend

    from megatron_terapipe.model import PrefixKVAttention

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    stock = get_gpt_layer_local_spec()
    config = _model_config(stock)
    assert megatron_lm.gpt_model_config(config, _ns()) is config
    assert config.transformer_layer_spec is stock  # without --token-pipeline: untouched

    token = _ns(token_pipeline=True)
    config = megatron_lm.gpt_model_config(_model_config(stock), token)
    provider = config.transformer_layer_spec
    assert callable(provider) and core(provider(config, vp_stage=None)) is PrefixKVAttention
    assert core(stock) is not PrefixKVAttention

    seen = []

    def with_vp(model_config, vp_stage=None):
        seen.append((model_config, vp_stage))
        return get_gpt_layer_local_spec()

    config = megatron_lm.gpt_model_config(_model_config(with_vp), token)
    assert core(config.transformer_layer_spec(config, vp_stage=1)) is PrefixKVAttention
    assert seen == [(config, 1)]
    config = megatron_lm.gpt_model_config(
        _model_config(lambda model_config: get_gpt_layer_local_spec()), token
    )
    assert core(config.transformer_layer_spec(config, vp_stage=0)) is PrefixKVAttention

    # core_v0.19.0's builder replaces core attention under the local backend after resolving
    # the spec: refused there, whoever set the backend.
    config = megatron_lm.gpt_model_config(_model_config(stock, AttnBackend.local), token)
    with pytest.raises(ValueError, match="--attention-backend local"):
        config.transformer_layer_spec(config, vp_stage=None)


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


# -- unsupported megatron-core features: one table, two checks ----------------------------------
# (Megatron-LM namespace attribute, a value that turns it on, the flag the message must name).
# Written by hand from Megatron-LM core_v0.16.1's arguments.py, not read from the table.
ARGS_CASES = [
    ("tp_comm_overlap", True, "--tp-comm-overlap"),
    ("cuda_graph_impl", "local", "--cuda-graph-impl"),
    ("cuda_graph_impl", "transformer_engine", "--cuda-graph-impl"),
    ("enable_cuda_graph", True, "--enable-cuda-graph"),
    ("external_cuda_graph", True, "--external-cuda-graph"),
    ("fp8", "hybrid", "--fp8-format"),
    ("fp4", "e2m1", "--fp4-format"),
    ("cpu_offloading_num_layers", 2, "--cpu-offloading-num-layers"),
    ("cpu_offloading", True, "--cpu-offloading-num-layers"),
    ("fine_grained_activation_offloading", True, "--fine-grained-activation-offloading"),
    ("delay_wgrad_compute", True, "--delay-wgrad-compute"),
    ("defer_embedding_wgrad_compute", True, "--defer-embedding-wgrad-compute"),
    ("overlap_moe_expert_parallel_comm", True, "--overlap-moe-expert-parallel-comm"),
    ("softmax_type", "off-by-one", "--softmax-type"),
    ("experimental_attention_variant", "gated_delta_net", "--experimental-attention-variant"),
    ("qk_clip", True, "--qk-clip"),
    ("log_max_attention_logit", True, "--log-max-attention-logit"),
    ("use_kitchen_attention", True, "--use-kitchen-attention"),
    ("is_hybrid_model", True, "--hybrid-override-pattern"),
    ("window_size", (128, 0), "--window-size"),
    ("moe_expert_capacity_factor", 1.0, "--moe-expert-capacity-factor"),
    ("moe_pad_expert_input_to_capacity", True, "--moe-pad-expert-input-to-capacity"),
    ("moe_router_load_balancing_type", "sinkhorn", "sinkhorn"),
    ("moe_input_jitter_eps", 0.01, "--moe-input-jitter-eps"),
    ("moe_enable_routing_replay", True, "--moe-enable-routing-replay"),
    ("moe_token_dispatcher_type", "flex", "--moe-token-dispatcher-type flex"),
    ("context_parallel_size", 2, "--context-parallel-size=2"),
    ("hybrid_context_parallel", True, "--hybrid-context-parallel"),
    ("mtp_num_layers", 1, "--mtp-num-layers"),
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("position_embedding_type", "mrope", "--position-embedding-type=mrope"),
    ("use_legacy_models", True, "--use-legacy-models"),
    ("sft", True, "--sft"),
    ("gtp_weight_remat_size", 2, "--tensor-parallel-num-weight-shards=2"),
]

# (TransformerConfig attribute, value that turns it on, the flag the message must name).
CONFIG_CASES = [
    ("tp_comm_overlap", True, "--tp-comm-overlap"),
    ("cuda_graph_impl", "local", "--cuda-graph-impl"),
    ("enable_cuda_graph", True, "--enable-cuda-graph"),
    ("external_cuda_graph", True, "--external-cuda-graph"),
    ("fp8", "e4m3", "--fp8-format"),
    ("fp4", "e2m1", "--fp4-format"),
    ("cpu_offloading", True, "--cpu-offloading-num-layers"),
    ("fine_grained_activation_offloading", True, "--fine-grained-activation-offloading"),
    ("delay_wgrad_compute", True, "--delay-wgrad-compute"),
    ("defer_embedding_wgrad_compute", True, "--defer-embedding-wgrad-compute"),
    ("overlap_moe_expert_parallel_comm", True, "--overlap-moe-expert-parallel-comm"),
    ("softmax_type", "learnable", "--softmax-type"),
    ("experimental_attention_variant", "dsa", "--experimental-attention-variant"),
    ("qk_clip", True, "--qk-clip"),
    ("log_max_attention_logit", True, "--log-max-attention-logit"),
    ("use_kitchen_attention", True, "--use-kitchen-attention"),
    ("is_hybrid_model", True, "--hybrid-override-pattern"),
    ("window_size", (128, 0), "--window-size"),
    ("moe_expert_capacity_factor", 1.0, "--moe-expert-capacity-factor"),
    ("moe_router_load_balancing_type", "sinkhorn", "sinkhorn"),
    ("moe_router_force_load_balancing", True, "--moe-router-force-load-balancing"),
    ("moe_token_dispatcher_type", "flex", "--moe-token-dispatcher-type flex"),
    ("context_parallel_size", 2, "--context-parallel-size"),
    ("hybrid_context_parallel", True, "--hybrid-context-parallel"),
    ("mtp_num_layers", 1, "--mtp-num-layers"),
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("variable_seq_lengths", True, "variable_seq_lengths"),
    ("num_microbatches_with_partial_activation_checkpoints", 2,
     "num_microbatches_with_partial_activation_checkpoints"),
    ("gtp_weight_remat_size", 2, "--tensor-parallel-num-weight-shards"),
]


def _megatron_lm_namespace(**overrides) -> argparse.Namespace:
    """A Megatron-LM namespace with --token-pipeline and megatron's defaults for the features
    under test (all off)."""
    values = dict(
        token_pipeline=True,
        token_pipeline_slices=4,
        cuda_graph_impl="none",
        softmax_type="vanilla",
        cpu_offloading_num_layers=0,
    )
    values.update(overrides)
    return _ns(**values)


def test_defaults_are_accepted():
    assert token_pipeline_errors(_megatron_lm_namespace()) == []
    check_token_pipeline_support(_stock_config())


@pytest.mark.parametrize("attr,value,flag", ARGS_CASES, ids=[f"{c[0]}={c[1]}" for c in ARGS_CASES])
def test_argument_time_rejection_names_the_flag(attr, value, flag):
    args = _megatron_lm_namespace(**{attr: value})
    with pytest.raises(TokenPipelineArgumentError) as info:
        megatron_lm.validate_args(args)
    messages = [e for e in info.value.errors if flag in e]
    assert len(messages) == 1, info.value.errors
    assert "--token-pipeline does not support" in messages[0]
    # Without --token-pipeline the same feature is megatron-core's business, not ours.
    assert (
        token_pipeline_errors(_megatron_lm_namespace(token_pipeline=False, **{attr: value})) == []
    )


def _stock_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    for key, value in overrides.items():  # after __post_init__: some need TE to construct
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    "attr,value,flag", CONFIG_CASES, ids=[f"{c[0]}={c[1]}" for c in CONFIG_CASES]
)
def test_config_rejection_names_the_flag(attr, value, flag):
    with pytest.raises(ValueError) as info:
        check_token_pipeline_support(_stock_config(**{attr: value}))
    text = str(info.value)
    assert flag in text and f"{attr}=" in text, text


def test_every_config_attribute_exists_in_megatron_core():
    """A misspelt attribute would never be on: the check would silently pass. An attribute
    newer than the installed megatron-core must name the release that introduced it."""
    from importlib.metadata import version

    from megatron.core.transformer.transformer_config import TransformerConfig

    installed = tuple(int(x) for x in version("megatron-core").split(".")[:3])
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    missing = [
        (feature.name, s.attr)
        for feature in UNSUPPORTED_FEATURES
        for s in feature.on_config
        if s.attr not in fields
        and not (s.since and installed < tuple(int(x) for x in s.since.split(".")))
    ]
    assert missing == []


def test_all_problems_reported_at_once():
    config = SimpleNamespace(tp_comm_overlap=True, fp8="e4m3", cpu_offloading=True)
    with pytest.raises(ValueError) as info:
        check_token_pipeline_support(config)
    for flag in ("--tp-comm-overlap", "--fp8-format", "--cpu-offloading-num-layers"):
        assert flag in str(info.value)


def test_argument_check_loads_no_torch():
    """The table is read before torch loads: a bad flag set fails in well under a second."""
    code = (
        "import sys, argparse\n"
        "from megatron_terapipe.arguments import token_pipeline_errors\n"
        "ns = argparse.Namespace(token_pipeline=True, seq_length=8, token_pipeline_slices=2,"
        " tp_comm_overlap=True)\n"
        "assert any('--tp-comm-overlap' in e for e in token_pipeline_errors(ns))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
