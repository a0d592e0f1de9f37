"""The last pipeline stage's losses and reports: per slice in, per micro-batch out, as stock.

For loss functions returning (loss, num_tokens, report) each slice's loss sum is divided by the
micro-batch's *total* token count (known before the first backward of that micro-batch, since its
backwards start after its last slice's forward) and the slices' reports are summed into one per
micro-batch. Two-value loss functions are assumed to return a per-slice token mean; slices are
weighted by their length, which is exact when every token counts (no loss mask) -- use the
three-value form for masked losses. The per-token-loss token count stays on the model's device:
nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MicrobatchLoss:
    """Per-slice loss outputs of one micro-batch on the last stage."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    num_tokens: torch.Tensor | int = 0  # the micro-batch's token count, summed over its slices
    reports: dict[int, Any] = field(default_factory=dict)
    three_values: bool = True


class StepLosses:
    """What the step's loss functions returned, and the loss each slice's backward starts from.

    `forward_data_store` is the forward-backward function's return value (one report per
    micro-batch, as stock); `total_num_tokens` what `finalize_model_grads` divides by with
    `calculate_per_token_loss`.
    """

    def __init__(self, *, token_slices: tuple[int, ...], seq_length: int, num_microbatches: int,
                 cp_size: int, collect_non_loss_data: bool, per_token_loss: bool,
                 device: torch.device) -> None:
        self.token_slices = token_slices
        self.seq_length = seq_length
        self.num_microbatches = num_microbatches
        self.cp_size = cp_size
        self.collect_non_loss_data = collect_non_loss_data
        self.per_token_loss = per_token_loss
        self.microbatches: dict[int, MicrobatchLoss] = {}
        self.forward_data_store: list = []
        self.total_num_tokens = torch.zeros([], dtype=torch.int, device=device)

    def loss_forward(self, m: int, t: int, output: Any, loss_func: Callable | None) -> Any:
        """Run the user's loss on one slice; stash what the micro-batch's report needs. Returns
        what the slice's backward starts from (until `scaled_loss` replaces it)."""
        record = self.microbatches.setdefault(m, MicrobatchLoss())
        if loss_func is None:
            self.forward_data_store.append(output)
            return output
        if self.collect_non_loss_data:
            record.reports[t] = loss_func(output, non_loss_data=True)
            self._finish_microbatch_report(m)
            return output
        outputs = loss_func(output)
        if len(outputs) == 3:
            loss, num_tokens, report = outputs
            record.num_tokens = record.num_tokens + num_tokens
            self.total_num_tokens += num_tokens.to(self.total_num_tokens.dtype)
        elif len(outputs) == 2:
            loss, report = outputs
            record.three_values = False
        else:
            raise ValueError(
                f"loss function returned {len(outputs)} values; expected 2 (loss, report) or 3 "
                "(loss, num_tokens, report) as with megatron-core's schedules"
            )
        record.losses[t] = loss
        record.reports[t] = report
        self._finish_microbatch_report(m)
        return loss

    def _finish_microbatch_report(self, m: int) -> None:
        """Once every slice of micro-batch m has its report, store one report like stock does."""
        record = self.microbatches[m]
        if len(record.reports) < len(self.token_slices):
            return
        reports = [record.reports[t] for t in range(len(self.token_slices))]
        if self.collect_non_loss_data:
            self.forward_data_store.append(reports)
        elif record.three_values:
            self.forward_data_store.append(sum_reports(reports))
        else:
            weights = [length / self.seq_length for length in self.token_slices]
            self.forward_data_store.append(weighted_reports(reports, weights))
        record.reports.clear()

    def scaled_loss(self, m: int, t: int) -> torch.Tensor:
        """The slice's share of the loss the stock schedule would backpropagate."""
        record = self.microbatches[m]
        loss = record.losses.pop(t)
        if record.three_values:
            if self.per_token_loss:
                return loss
            return loss / torch.clamp(record.num_tokens, min=1) / self.num_microbatches
        weight = self.token_slices[t] / self.seq_length
        return loss * weight * self.cp_size / self.num_microbatches


def sum_reports(reports: Sequence[Any]) -> Any:
    """Slices' reports added leaf by leaf (dicts, lists and tuples of tensors or numbers)."""
    first = reports[0]
    if isinstance(first, dict):
        return {key: sum_reports([r[key] for r in reports]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(sum_reports(list(items)) for items in zip(*reports))
    if isinstance(first, torch.Tensor):
        total = first.clone()
        for other in reports[1:]:
            total = total + other
        return total
    return sum(reports)


def weighted_reports(reports: Sequence[Any], weights: Sequence[float]) -> Any:
    """Slices' per-token-mean reports combined into the micro-batch's mean, leaf by leaf."""
    first = reports[0]
    if isinstance(first, dict):
        return {key: weighted_reports([r[key] for r in reports], weights) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(weighted_reports(list(items), weights) for items in zip(*reports))
    total = first * weights[0]
    for other, weight in zip(reports[1:], weights[1:]):
        total = total + other * weight
    return total
