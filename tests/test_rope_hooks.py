"""RoPE-offset hooks are installed once per model; later steps do not walk the model again."""

from __future__ import annotations

import torch

from megatron_terapipe.model.positions import install_rope_offset_hooks


def _model_with_rope() -> torch.nn.Module:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return torch.nn.Sequential(
        torch.nn.Linear(2, 2),
        RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True),
    )


def test_hooks_installed_once_and_later_calls_skip_the_walk(monkeypatch):
    model = _model_with_rope()
    assert install_rope_offset_hooks([model]) == 1
    rope = model[1]
    assert len(rope._forward_pre_hooks) == 1

    def no_walk():
        raise AssertionError("install_rope_offset_hooks walked an already hooked model")

    monkeypatch.setattr(model, "modules", no_walk)
    for _ in range(3):
        assert install_rope_offset_hooks([model]) == 0
    assert len(rope._forward_pre_hooks) == 1


def test_a_new_model_is_hooked_too():
    first, second = _model_with_rope(), _model_with_rope()
    assert install_rope_offset_hooks([first]) == 1
    assert install_rope_offset_hooks([first, second]) == 1
    assert install_rope_offset_hooks([second]) == 0
    assert len(second[1]._forward_pre_hooks) == 1
