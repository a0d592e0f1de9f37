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


# -- 0.18.0: the interleaved schedule waits for an overlapped send before deallocating -------
def _folded_source(function: Any) -> str:
    try:
        return "".join(inspect.getsource(function).split())
    except (OSError, TypeError):  # no source: assume the older behaviour
        return ""


def interleaved_schedule_waits_for_send(source: str) -> bool:
    """Whether this (whitespace-folded) source of megatron-core's interleaved schedule waits for
    an overlapped forward send to finish before `deallocate_output_tensor` frees its data.

    Without that wait (before 0.18) a deallocated output may still be read by its asynchronous
    send, and the next stage can receive freed memory: wrong activations, at times NaN.
    """
    return "ifsend_next_wait_handleisnotNoneandconfig.deallocate_pipeline_outputs:" in source


INTERLEAVED_SCHEDULE_WAITS_FOR_SEND_BEFORE_DEALLOCATING = interleaved_schedule_waits_for_send(
    _folded_source(_schedules.forward_backward_pipelining_with_interleaving)
)



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


# -- 0.17+: the MoE aux-loss scale may come from config.moe_grad_scale_func --------------------
def set_moe_aux_loss_scale(config: Any, num_microbatches: int, cp_size: int, device: Any) -> None:
    """Set `MoEAuxLossAutoScaler`'s scale as megatron-core's forward step does for an MoE model.

    The aux and z-losses backpropagate through that class with the scale stock sets after every
    forward step: the model's loss scale (from `moe_grad_scale_func` where the release has it,
    else `grad_scale_func`), divided by the number of micro-batches unless the loss is summed
    per token. Nothing is set for a dense model, as in stock.
    """
    if getattr(config, "num_moe_experts", None) is None:
        return
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    moe_loss_scale = getattr(_schedules, "_get_moe_loss_scale", None)
    if moe_loss_scale is not None:
        loss_scale = moe_loss_scale(config, device)
    elif config.grad_scale_func is not None:
        loss_scale = config.grad_scale_func(torch.ones(1, device=device))
    else:
        loss_scale = torch.ones(1, device=device)
    if config.calculate_per_token_loss:
        MoEAuxLossAutoScaler.set_loss_scale(loss_scale)
    else:
        MoEAuxLossAutoScaler.set_loss_scale(loss_scale * cp_size / num_microbatches)


# -- 0.17+: the MoE aux-loss tracker became MoEMetricsTracker (report() syncs, logs, clears) --
class _ScalarCapture:
    """A TensorBoard-writer stand-in: keeps what megatron-core would write, by tag."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name: str, value: Any, iteration: int) -> None:
        self.scalars[name] = float(value)


def moe_logged_metrics(num_layers: int, loss_scale: float, iteration: int = 0) -> dict[str, float]:
    """What megatron-core's MoE tracker logs for the step just run, then clear it as stock does.

    The tracker's own reporting path (reduction across pipeline, tensor and data-parallel ranks,
    the per-layer values and their mean over MoE layers) writes into a capturing writer, so the
    numbers are those a Megatron-LM run writes to TensorBoard: tags `<name>` and
    `moe/<name>_layer_<i>`. Collective: every rank of the model calls it.
    """
    from megatron.core.transformer.moe import moe_utils

    writer = _ScalarCapture()
    tracker_module = None
    with contextlib.suppress(ImportError):
        from megatron.core.transformer.moe import moe_logging as tracker_module
    get_tracker = getattr(tracker_module, "get_moe_metrics_tracker", None)
    if get_tracker is not None:  # 0.17+: report() reduces, writes and clears
        get_tracker().report(
            loss_scale=loss_scale,
            iteration=iteration,
            writer=writer,
            per_layer_logging=True,
            num_layers=num_layers,
        )
    else:
        moe_utils.track_moe_metrics(
            loss_scale=loss_scale,
            iteration=iteration,
            writer=writer,
            per_layer_logging=True,
            num_layers=num_layers,
        )
        moe_utils.clear_aux_losses_tracker()
    return writer.scalars


def report_moe_losses(
    track_names: list[str], num_layers: int, loss_scale: float, iteration: int, writer: Any = None
) -> dict[str, float]:
    """The step's MoE aux losses as Megatron-LM's training log reads them, then clear them.

    Megatron-LM's `training_log` calls megatron-core's tracker every iteration with its
    `total_loss_dict`: the tracker reduces each name over the ranks, takes the mean over MoE
    layers, scales it by `loss_scale` (1 / micro-batches), adds it to the dict and clears
    itself. This does the same and returns what was added. `force_initialize` creates the names
    a rank never recorded (as Megatron-LM, so every rank reduces the same tensors). Before
    0.17 the tracker adds to the dict only when a writer is given, so a capturing one stands in
    for a missing TensorBoard writer. Collective: every rank of the model calls it.
    """
    from megatron.core.transformer.moe import moe_utils

    totals: dict[str, Any] = {}
    kwargs = dict(
        loss_scale=loss_scale,
        iteration=iteration,
        writer=writer if writer is not None else _ScalarCapture(),
        total_loss_dict=totals,
        per_layer_logging=False,
        force_initialize=True,
        track_names=track_names,
        num_layers=num_layers,
    )
    tracker_module = None
    with contextlib.suppress(ImportError):
        from megatron.core.transformer.moe import moe_logging as tracker_module
    get_tracker = getattr(tracker_module, "get_moe_metrics_tracker", None)
    if get_tracker is not None:  # 0.17+: report() reduces, writes, adds and clears
        get_tracker().report(**kwargs)
    else:
        moe_utils.track_moe_metrics(**kwargs)
        moe_utils.clear_aux_losses_tracker()
    return {name: float(value) for name, value in totals.items()}


def clear_moe_metrics() -> None:
    """Zero the tracker's values (Megatron-LM does after evaluation, before the next step)."""
    tracker_module = None
    with contextlib.suppress(ImportError):
        from megatron.core.transformer.moe import moe_logging as tracker_module
    get_tracker = getattr(tracker_module, "get_moe_metrics_tracker", None)
    if get_tracker is not None:  # 0.17+
        get_tracker().clear()
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.clear_aux_losses_tracker()


def reset_moe_metrics() -> None:
    """Forget every MoE metric entry, as a fresh process has none (entries are sized by the
    model's layer count when first recorded, so a model with more layers cannot reuse them)."""
    tracker_module = None
    with contextlib.suppress(ImportError):
        from megatron.core.transformer.moe import moe_logging as tracker_module
    destroy = getattr(tracker_module, "destroy_moe_metrics_tracker", None)
    if destroy is not None:  # 0.17+
        destroy()
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()


def moe_rank_local_metrics() -> set[str]:
    """The MoE metrics megatron-core logs as each rank recorded them (no reduction over the
    ranks that share a micro-batch's tokens or the data-parallel ranks): megatron-core 0.16's
    z-loss. Their logged value is a per-rank mean, which depends on how tokens are laid out."""
    tracker_module = None
    with contextlib.suppress(ImportError):
        from megatron.core.transformer.moe import moe_logging as tracker_module
    get_tracker = getattr(tracker_module, "get_moe_metrics_tracker", None)
    if get_tracker is not None:  # 0.17+
        entries = {
            name: (e.reduce_group, e.avg_group, e.needs_dp_avg)
            for name, e in get_tracker().metrics.items()
        }
    else:
        from megatron.core.transformer.moe import moe_utils

        entries = {
            name: (e.get("reduce_group"), e.get("avg_group"), e.get("reduce_group") is not None)
            for name, e in moe_utils.get_moe_layer_wise_logging_tracker().items()
        }
    return {
        name
        for name, (reduce_group, avg_group, dp_avg) in entries.items()
        if reduce_group is None and avg_group is None and not dp_avg
    }
