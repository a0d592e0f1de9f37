"""training/model.py builds what the flags say: the attention kernel is chosen by flags only."""

import pytest

from megatron_terapipe.training import args as targs
from megatron_terapipe.training import model as provider

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "0.1",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
        "--distributed-backend", "gloo", "--transformer-impl", "local"]


def _args(*extra: str):
    return targs.validate_args(targs.parse_args(BASE + list(extra)), world_size=1)


def _core_attention(args) -> type:
    return provider.layer_spec(args).submodules.self_attention.submodules.core_attention


@pytest.mark.parametrize("extra, kernel, cls", [
    ((), "local", "DotProductAttention"),
    (("--attention-backend", "local"), "local", "DotProductAttention"),
    (("--attention-backend", "flash"), "sdpa", "PrefixKVAttention"),
    (("--token-pipeline", "--token-pipeline-slices", "2"), "sdpa", "PrefixKVAttention"),
])
def test_attention_kernel_follows_the_flags(extra, kernel, cls):
    args = _args(*extra)
    assert provider.attention_kernel(args) == kernel
    assert _core_attention(args).__name__ == cls


def test_local_attention_cannot_run_the_token_pipeline():
    args = targs.parse_args(BASE + ["--attention-backend", "local", "--token-pipeline"])
    errors = targs.validation_errors(args, world_size=1)
    assert any("--attention-backend local" in e for e in errors), errors


def test_unknown_backend_is_an_argparse_error():
    with pytest.raises(SystemExit):
        targs.parse_args(BASE + ["--attention-backend", "fused"])
