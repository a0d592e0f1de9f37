"""The megatron-core API differences between the releases this package runs on (0.16.1-0.19.x).

Every difference the rest of the package meets is bridged here, once, and named for what changed
and the release it changed in. Each is detected from the installed megatron-core itself (a
signature, an attribute), never from a version string, so a backport or a patched build takes
the right path. Modules outside `compat/` import the bridged names from here and never test a
megatron-core version themselves.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from megatron.core.pipeline_parallel import schedules as _schedules

# -- 0.17.0: schedules.backward_step lost its model_type argument ------------------------------
# Bound at import, as a `from ... import backward_step` would: a recorder that wraps
# megatron-core's schedules module around a stock step never sees the token pipeline's calls.
_megatron_backward_step = _schedules.backward_step
BACKWARD_STEP_TAKES_MODEL_TYPE = "model_type" in inspect.signature(
    _megatron_backward_step
).parameters


def backward_step(input_tensor: Any, output_tensor: Any, output_tensor_grad: Any,
                  config: Any) -> Any:
    """megatron-core's `backward_step` with the 0.17+ signature.

    The model type it took before 0.17.0 was read only for encoder-decoder models, which the
    token pipeline refuses, so the decoder-only type is passed there.
    """
    if BACKWARD_STEP_TAKES_MODEL_TYPE:
        from megatron.core.enums import ModelType

        return _megatron_backward_step(
            input_tensor, output_tensor, output_tensor_grad, ModelType.encoder_or_decoder, config
        )
    return _megatron_backward_step(input_tensor, output_tensor, output_tensor_grad, config)


# -- 0.19.0: optimizer state is matched to param groups by their max_lr / min_lr --------------
def _saved_param_groups(state: Any) -> list[dict]:
    """Every saved param group in `state` (an optimizer state dict, chained ones included), in
    the order the optimizer lists its `param_groups`."""
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
            return list(groups)
        return [g for value in state.values() for g in _saved_param_groups(value)]
    if isinstance(state, (list, tuple)):
        return [g for value in state for g in _saved_param_groups(value)]
    return []


def load_optimizer_state(optimizer: Any, state: Any) -> None:
    """`optimizer.load_state_dict(state)` for a run whose --lr / --min-lr may differ from the
    checkpoint's.

    Since 0.19.0 megatron-core pairs saved param groups with the current ones by an identifier
    that includes each group's max_lr and min_lr, so a resume with new learning-rate flags finds
    no matching group and fails; before, groups were paired by position and loading brought back
    the checkpoint's values. Giving the current groups the saved values first (paired by
    position, as the same model and flags build them) makes every release load the checkpoint's
    values; the caller then decides whether the flags override them.
    """
    saved = _saved_param_groups(state)
    if len(saved) == len(optimizer.param_groups):
        for group, saved_group in zip(optimizer.param_groups, saved):
            for key in ("max_lr", "min_lr"):
                if key in saved_group and key in group:
                    group[key] = saved_group[key]
    optimizer.load_state_dict(state)


# -- every release: the autocast megatron-core's forward_step enters -------------------------
def forward_autocast(config: Any) -> Any:
    """The context megatron-core's `forward_step` runs the user's forward step in.

    megatron-core autocasts CUDA operations (device type "cuda", whatever the model's device)
    when `config.enable_autocast` is set; the token pipeline enters the same context so that a
    sliced forward computes in the dtypes the stock one does, on GPUs and CPUs alike.
    """
    if getattr(config, "enable_autocast", False):
        import torch

        return torch.autocast("cuda", dtype=config.autocast_dtype)
    return contextlib.nullcontext()
