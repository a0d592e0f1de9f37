"""Which megatron-core features the token pipeline supports; a clear error for the rest.

The features themselves are listed once, in `megatron_terapipe.unsupported_features`, which
the argument check reads too; this adds what only the built models can tell.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_terapipe.unsupported_features import config_problems


def unsupported_features(config) -> list[str]:
    """Enabled features of a TransformerConfig that token slicing cannot run exactly, each
    with the attribute that is on and the Megatron-LM flag that turns it on."""
    return config_problems(config)


def check_token_pipeline_support(config, models: Sequence | None = None) -> None:
    """Raise ValueError naming every unsupported feature that is on."""
    problems = unsupported_features(config)
    for model in models or ():
        from megatron.core.enums import ModelType
        from megatron.core.utils import get_model_type

        if get_model_type(model) == getattr(ModelType, "encoder_and_decoder", None):
            problems.append("encoder-decoder models")
            break
    if problems:
        raise ValueError(
            "token pipeline does not support: " + "; ".join(problems) + ". Turn these off or "
            "use megatron-core's own schedules."
        )
