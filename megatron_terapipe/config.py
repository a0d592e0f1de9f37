"""TokenPipelineConfig: which token schedule runs, and how it cuts sequences into slices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_terapipe.schedules.generators import TOKEN_SCHEDULES
from megatron_terapipe.token_slices import equal_token_slices, validate_token_slices


@dataclass
class TokenPipelineConfig:
    """Configuration of the token-level pipeline, in the style of megatron-core's dataclasses.

    Exactly one slice source is used, in this order of precedence: `plan` (a planner result with a
    `token_slices` attribute), `token_slices` (explicit lengths), `num_token_slices` (equal cuts).
    """

    schedule: str = "terapipe"
    num_token_slices: int | None = None
    token_slices: Sequence[int] | None = None
    plan: Any = None
    # Record per-action start/end times on every rank (for measured timelines).
    record_timeline: bool = False
    # Split each backward that sends a gradient into B (input gradient, sent at once) and W
    # (weight-gradient GEMMs), as `schedules.generators.split_backward_orders` describes.
    split_backward: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in TOKEN_SCHEDULES:
            raise ValueError(
                f"TokenPipelineConfig.schedule={self.schedule!r} is not a token schedule; "
                f"valid choices: {', '.join(TOKEN_SCHEDULES)}"
            )
        sources = [
            name
            for name, value in (
                ("plan", self.plan),
                ("token_slices", self.token_slices),
                ("num_token_slices", self.num_token_slices),
            )
            if value is not None
        ]
        if not sources:
            raise ValueError(
                "TokenPipelineConfig needs one of num_token_slices, token_slices or plan"
            )
        if self.num_token_slices is not None and self.num_token_slices < 1:
            raise ValueError(f"num_token_slices must be >= 1, got {self.num_token_slices}")
        if self.token_slices is not None:
            self.token_slices = tuple(int(x) for x in self.token_slices)

    def resolve_token_slices(self, seq_length: int, multiple_of: int = 1) -> tuple[int, ...]:
        """The concrete slice lengths for `seq_length`, validated (ValueError names the rule)."""
        if self.plan is not None:
            return validate_token_slices(self.plan.token_slices, seq_length, multiple_of, "plan")
        if self.token_slices is not None:
            return validate_token_slices(self.token_slices, seq_length, multiple_of)
        return equal_token_slices(seq_length, self.num_token_slices, multiple_of)
