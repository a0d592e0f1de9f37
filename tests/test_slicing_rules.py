"""Bad token slicings and unsupported features are refused before any compute, by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_terapipe.config import TokenPipelineConfig
from megatron_terapipe.schedules.support import check_token_pipeline_support
from megatron_terapipe.token_slices import equal_token_slices, slice_offsets, validate_token_slices


@pytest.mark.parametrize(
    "slices,seq,multiple,message",
    [
        ([], 8, 1, "must not be empty"),
        ([4, 0, 4], 8, 1, "must be >= 1"),
        ([10, -2], 8, 1, "must be >= 1"),
        ([4, 4, 4], 8, 1, "sum to 12, but must sum to seq_length=8"),
        ([2, 2], 8, 1, "sum to 4"),
        ([3, 5], 8, 2, "multiple of 2"),
    ],
)
def test_invalid_slices_name_the_rule(slices, seq, multiple, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_token_slices(slices, seq, multiple)
    assert str(list(slices)) in str(info.value) or not slices


def test_equal_slices():
    assert equal_token_slices(10, 3) == (4, 3, 3)
    assert equal_token_slices(16, 3, multiple_of=2) == (6, 6, 4)
    assert slice_offsets((4, 3, 3)) == (0, 4, 7)
    with pytest.raises(ValueError, match="at most 8 slices"):
        equal_token_slices(8, 9)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        equal_token_slices(10, 2, multiple_of=4)


def test_config_resolves_and_rejects():
    assert TokenPipelineConfig(num_token_slices=4).resolve_token_slices(32) == (8, 8, 8, 8)
    assert TokenPipelineConfig(token_slices=[1, 31]).resolve_token_slices(32) == (1, 31)
    plan = SimpleNamespace(token_slices=(16, 16))
    assert TokenPipelineConfig(plan=plan).resolve_token_slices(32) == (16, 16)
    with pytest.raises(ValueError, match="valid choices: terapipe, token-1f1b, token-interleaved"):
        TokenPipelineConfig(schedule="1f1b", num_token_slices=2)
    with pytest.raises(ValueError, match="needs one of"):
        TokenPipelineConfig()
    with pytest.raises(ValueError, match="multiple of 2"):
        TokenPipelineConfig(token_slices=[3, 29]).resolve_token_slices(32, multiple_of=2)


def test_unsupported_features_are_named():
    config = SimpleNamespace(
        context_parallel_size=2, moe_expert_capacity_factor=1.0, mtp_num_layers=None,
        sequence_parallel=False,
    )
    with pytest.raises(ValueError) as info:
        check_token_pipeline_support(config)
    assert "context parallelism" in str(info.value) and "MoE" in str(info.value)
    check_token_pipeline_support(SimpleNamespace(context_parallel_size=1))


def test_slice_batch_cuts_sequence_tensors_contiguously():
    """User loss code calls .view(-1) on what it gets, so slices must be contiguous."""
    import torch

    from megatron_terapipe.model.batch_slicing import slice_batch

    tokens = torch.arange(2 * 8).view(2, 8)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    sliced = slice_batch({"tokens": tokens, "mask": mask, "n": 3, "other": torch.zeros(5)}, 8, 2, 3)
    assert torch.equal(sliced["tokens"], tokens[:, 2:5]) and sliced["tokens"].is_contiguous()
    assert sliced["mask"].shape == (2, 1, 3, 5) and sliced["mask"].is_contiguous()
    assert sliced["n"] == 3 and sliced["other"].shape == (5,)
