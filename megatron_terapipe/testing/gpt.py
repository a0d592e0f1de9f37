"""Test support only: small megatron-core GPT models built identically for every layout.

No product module imports this package (tests/test_product_imports.py enforces it); the
trainer, the benchmark and the demo build their models through `training.model`, and every
config, these included, comes from `model.transformer_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch


@dataclass(frozen=True)
class TinyGPT:
    """Model shape and training knobs of a test model (Megatron-LM names where they exist)."""

    num_layers: int = 4
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 128
    seq_length: int = 32
    position_embedding_type: str = "learned_absolute"
    tie_embeddings: bool = True
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    bf16: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    config_overrides: dict = field(default_factory=dict)

    def with_(self, **changes: Any) -> TinyGPT:
        return replace(self, **changes)


def transformer_config(
    model: TinyGPT,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int | None = None,
    sequence_parallel: bool = False,
    **overrides: Any,
):
    """megatron-core TransformerConfig for `model` under the given parallel layout.

    The product's `model.transformer_config` with `model`'s settings, so a test's reference
    and the run under test are configured as the trainer configures its models.
    `model.config_overrides`, then `overrides`, are Megatron-LM settings or TransformerConfig
    fields, passed on as such.
    """
    from megatron_terapipe.model.transformer_config import megatron_settings
    from megatron_terapipe.model.transformer_config import transformer_config as build

    # TinyGPT's fields carry Megatron-LM's names, so they map as the trainer's flags do.
    settings = megatron_settings(model)
    settings.update(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        sequence_parallel=sequence_parallel,
    )
    settings.update(model.config_overrides)
    settings.update(overrides)
    return build(**settings)


def build_gpt_chunks(model: TinyGPT, config, layer_spec=None) -> list:
    """The GPTModel chunks this rank holds (one per virtual stage), as megatron-LM builds them."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if layer_spec is None:
        layer_spec = get_gpt_layer_local_spec()
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunks.append(
            GPTModel(
                config,
                layer_spec,
                vocab_size=model.vocab_size,
                max_sequence_length=model.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                share_embeddings_and_output_weights=model.tie_embeddings,
                position_embedding_type=model.position_embedding_type,
                vp_stage=stage,
            )
        )
    return chunks


def make_microbatches(
    model: TinyGPT, micro_batch_size: int, num_microbatches: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Deterministic token batches with a ragged loss mask (the benchmark's synthetic data)."""
    from megatron_terapipe.model.synthetic_batches import synthetic_microbatches

    return synthetic_microbatches(
        model.vocab_size, model.seq_length, micro_batch_size, num_microbatches, seed
    )


def loss_func_per_token(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss: (sum of masked token losses, token count, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def loss_func_mean(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """An older-style loss returning (mean loss, report): two values."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum()
    return loss, {"lm loss": loss.clone().detach()}


def gpt_forward_step(data_iterator, model, loss_func=loss_func_per_token):
    """A user forward_step_func in the style of pretrain_gpt.py."""
    batch = next(data_iterator)
    padding = {"padding_mask": batch["padding_mask"]} if "padding_mask" in batch else {}
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **padding
    )
    return output, partial(loss_func, batch["loss_mask"])


def gpt_forward_step_mean_loss(data_iterator, model):
    return gpt_forward_step(data_iterator, model, loss_func=loss_func_mean)
