"""One message per mistake: a flag set with k mistakes is refused with exactly k messages.

The rules below used to be checked in two places (the trainer's own validation and the
token-pipeline check, or the upstream hook and the token-pipeline check), so one bad flag
printed two messages in different words. Each case is run through both entry points that
exist: our trainer's parse-and-validate path (`training.args`) and the hook upstream
Megatron-LM calls (`megatron_lm.validate_args`) on a Megatron-LM-like namespace.

A mistake is (trainer flags, hook namespace attributes, flag, marker): exactly one message
contains the marker, and that message names the flag.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import pytest

from megatron_terapipe import megatron_lm
from megatron_terapipe.arguments import TokenPipelineArgumentError, parse_slices
from megatron_terapipe.training import args as targs

BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "16",
    "--lr", "1e-3", "--train-iters", "20", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--token-pipeline",
]  # fmt: skip


class Mistake(NamedTuple):
    flags: list[str]  # added to BASE on the trainer path
    attrs: dict[str, Any]  # set on the Megatron-LM namespace on the hook path
    flag: str  # the message must name it
    marker: str  # found in exactly one message


# Two groups of mistakes that can be made together (group "pp1" needs one pipeline stage).
MISTAKES: dict[str, dict[str, Mistake]] = {
    "pp2": {
        "micro-batches not divisible by PP under virtual stages": Mistake(
            ["--token-pipeline-schedule", "token-interleaved",
             "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6"],
            {"token_pipeline_schedule": "token-interleaved",
             "virtual_pipeline_model_parallel_size": 2, "global_batch_size": 6},
            "--global-batch-size", "micro-batches per step",
        ),
        "sequence not divisible by TP under sequence parallelism": Mistake(
            ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "127"],
            {"tensor_model_parallel_size": 2, "sequence_parallel": True, "seq_length": 127},
            "--seq-length=127", "--sequence-parallel needs",
        ),
        "context parallelism": Mistake(
            ["--context-parallel-size", "2"], {"context_parallel_size": 2},
            "--context-parallel-size", "context parallel",
        ),
        "relative positions": Mistake(
            ["--position-embedding-type", "relative"], {"position_embedding_type": "relative"},
            "--position-embedding-type", "relative",
        ),
        "local attention backend": Mistake(
            ["--attention-backend", "local"], {"attention_backend": "local"},
            "--attention-backend", "--attention-backend local",
        ),
        "granularity not dividing the sequence": Mistake(
            ["--token-pipeline-granularity", "48"], {"token_pipeline_granularity": 48},
            "--token-pipeline-granularity=48", "--token-pipeline-granularity=48",
        ),
        "unknown cost model": Mistake(
            ["--token-pipeline-cost-model", "roofline"],
            {"token_pipeline_cost_model": "roofline"},
            "--token-pipeline-cost-model", "roofline",
        ),
    },
    "pp1": {
        "virtual stages without a pipeline": Mistake(
            ["--pipeline-model-parallel-size", "1", "--num-layers-per-virtual-pipeline-stage",
             "2"],
            {"pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": 2},
            "--pipeline-model-parallel-size", ">= 2, got 1",
        ),
        "split backward without gradient-accumulation fusion": Mistake(
            ["--token-pipeline-split-backward", "--no-gradient-accumulation-fusion"],
            {"token_pipeline_split_backward": True, "gradient_accumulation_fusion": False},
            "--no-gradient-accumulation-fusion", "gradient-accumulation fusion",
        ),
        "unknown cost model": Mistake(
            ["--token-pipeline-cost-model", "roofline"],
            {"token_pipeline_cost_model": "roofline"},
            "--token-pipeline-cost-model", "roofline",
        ),
    },
}


def trainer_messages(mistakes: list[Mistake]) -> list[str]:
    """The trainer's messages (`pretrain_gpt.py`'s parse and validate) for BASE + mistakes,
    on exactly the ranks the model-parallel sizes need (data-parallel size 1)."""
    flags = BASE + [flag for m in mistakes for flag in m.flags]
    args = targs.parse_args(flags)
    world = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
             * args.context_parallel_size)
    return targs.validation_errors(args, world)


def hook_messages(mistakes: list[Mistake]) -> list[str]:
    """The messages of the hook upstream Megatron-LM calls after its own validate_args."""
    parser = megatron_lm.combined_extra_args_provider(None)(argparse.ArgumentParser())
    args = parser.parse_args(["--token-pipeline"])
    values: dict[str, Any] = dict(
        seq_length=128, micro_batch_size=2, global_batch_size=16, data_parallel_size=1,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=1,
        sequence_parallel=False, num_layers=4, virtual_pipeline_model_parallel_size=None,
        position_embedding_type="learned_absolute", attention_backend="auto",
        gradient_accumulation_fusion=True, transformer_impl="local", rank=0,
    )
    for mistake in mistakes:
        values.update(mistake.attrs)
    for key, value in values.items():
        setattr(args, key, value)
    try:
        megatron_lm.validate_args(args)
    except TokenPipelineArgumentError as exc:
        return exc.errors
    return []


PATHS = {"trainer": trainer_messages, "megatron-lm hook": hook_messages}


def assert_one_message_each(messages: list[str], mistakes: list[Mistake]) -> None:
    assert len(messages) == len(mistakes), messages
    for mistake in mistakes:
        hits = [m for m in messages if mistake.marker in m]
        assert len(hits) == 1, (mistake.marker, messages)
        assert mistake.flag in hits[0], (mistake.flag, hits[0])


SINGLE = [(group, name) for group, cases in MISTAKES.items() for name in cases]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group,name", SINGLE, ids=[f"{g}:{n}" for g, n in SINGLE])
def test_one_mistake_one_message(path, group, name):
    mistake = MISTAKES[group][name]
    assert_one_message_each(PATHS[path]([mistake]), [mistake])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group", MISTAKES)
def test_k_mistakes_k_messages(path, group):
    mistakes = list(MISTAKES[group].values())
    assert_one_message_each(PATHS[path](mistakes), mistakes)


@pytest.mark.parametrize("path", PATHS)
def test_the_base_flag_set_has_no_mistake(path):
    assert PATHS[path]([]) == []


# -- one grammar, one rule: the argument check and the planner word a bad value alike -------
@pytest.mark.parametrize("value", ["eight", "12,x", ","])
def test_slices_grammar_is_one_parser(value):
    """The argparse type and the planner parse --token-pipeline-slices with one grammar."""
    from megatron_terapipe.slicing import parse_token_pipeline_slices

    with pytest.raises(argparse.ArgumentTypeError) as cli:
        parse_slices(value)
    with pytest.raises(ValueError) as planner:
        parse_token_pipeline_slices(value)
    assert str(planner.value) == f"--token-pipeline-slices={cli.value}"


def _planner_namespace(**overrides: Any) -> argparse.Namespace:
    values = dict(
        token_pipeline=True, seq_length=128, micro_batch_size=2, global_batch_size=16,
        data_parallel_size=1, tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
        sequence_parallel=False, token_pipeline_slices="auto", token_pipeline_granularity=None,
        token_pipeline_cost_model="analytic:cpu", token_pipeline_memory_cap=None,
        token_pipeline_schedule="terapipe", num_layers=4, hidden_size=64,
        num_attention_heads=4, padded_vocab_size=256,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_pipeline_granularity": 48},
        {"token_pipeline_granularity": 3, "seq_length": 126, "tensor_model_parallel_size": 2,
         "sequence_parallel": True},
        {"token_pipeline_cost_model": "roofline"},
        {"token_pipeline_cost_model": "/nonexistent/table.npz"},
    ],
)
def test_argument_check_and_planner_give_the_same_message(overrides):
    """A value the argument check refuses is refused by the planner (for callers that skip
    the check) with the very same message."""
    from megatron_terapipe.arguments import token_pipeline_errors
    from megatron_terapipe.slicing import plan_from_args

    args = _planner_namespace(**overrides)
    with pytest.raises(ValueError) as planner:
        plan_from_args(args)
    assert token_pipeline_errors(args) == [str(planner.value)]


# -- prefix-KV attention refuses from the same table ----------------------------------------
def test_attention_features_are_rows_of_the_table():
    """A renamed row would silently drop out of PrefixKVAttention's check."""
    from megatron_terapipe.unsupported_features import ATTENTION_FEATURES, UNSUPPORTED_FEATURES

    names = {feature.name for feature in UNSUPPORTED_FEATURES}
    assert set(ATTENTION_FEATURES) <= names


@pytest.mark.parametrize(
    "attr,value,flag",
    [("window_size", (128, 0), "--window-size"), ("softmax_type", "learnable", "--softmax-type"),
     ("context_parallel_size", 2, "--context-parallel-size")],
)
def test_prefix_attention_refuses_with_the_table_message(attr, value, flag):
    """Building the layer refuses what the executor's support check refuses, in its words."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_terapipe.model.prefix_attention import PrefixKVAttention
    from megatron_terapipe.schedules.support import unsupported_features

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    setattr(config, attr, value)  # after __post_init__: some need TE to construct
    (problem,) = unsupported_features(config)
    with pytest.raises(ValueError) as info:
        PrefixKVAttention(config, 1, AttnMaskType.causal, "self")
    assert flag in problem and str(info.value).endswith(problem)
