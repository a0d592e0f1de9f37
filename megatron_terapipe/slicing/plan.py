"""SlicingPlan: the planner's answer, in a form that survives JSON and a broadcast.

The executor reads `token_slices` only: Megatron runs micro-batches of one size, all cut the
same way. `batch_slices` is the planner's advice about the batch dimension (TeraPipe's second
DP): when it holds sizes other than the micro-batch size you run with, it tells you which
micro-batch size to pick. When the batch DP chose mixed sizes,
`extra["token_slices_per_batch_slice"]` keeps every size's own slicing and `token_slices` is the
slicing of the largest batch slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_terapipe.token_slices import slice_offsets

PLAN_TITLE = " token pipeline plan "


@dataclass
class SlicingPlan:
    """Token and batch slices chosen for one pipeline, and what the cost model predicts.

    Three numbers, so that a prediction compared with a measured step is always of this plan:
    `objective` is TeraPipe's Σ t + (K−1)·max t over this plan's units (the DP's objective;
    the plan's own value, not the DP's optimum when another plan was kept), and
    `simulated_step_time` is the schedule simulator's makespan of this plan when it was scored
    by simulation (NaN otherwise). `predicted_step_time` is the one of the two the plan was
    chosen by (extra["score"]). All are one step's pipeline forward+backward seconds; the
    optimizer step, data loading and the embedding/LM head are not in them. `t_max` is the
    slowest unit's stage time: TeraPipe's bound.
    """

    token_slices: tuple[int, ...]
    batch_slices: tuple[int, ...]
    predicted_step_time: float
    t_max: float
    strategy: str
    cost_model: str
    extra: dict = field(default_factory=dict)
    objective: float = math.nan
    simulated_step_time: float = math.nan

    def __post_init__(self) -> None:
        self.token_slices = tuple(int(x) for x in self.token_slices)
        self.batch_slices = tuple(int(x) for x in self.batch_slices)
        self.predicted_step_time = float(self.predicted_step_time)
        self.t_max = float(self.t_max)
        self.objective = float(self.objective)
        self.simulated_step_time = float(self.simulated_step_time)

    @property
    def simulated(self) -> bool:
        return not math.isnan(self.simulated_step_time)

    @property
    def num_token_slices(self) -> int:
        return len(self.token_slices)

    @property
    def seq_length(self) -> int:
        return sum(self.token_slices)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only, so the dict crosses json.dumps and broadcast_object_list alike."""
        return {
            "token_slices": list(self.token_slices),
            "batch_slices": list(self.batch_slices),
            "predicted_step_time": _json_float(self.predicted_step_time),
            "objective": _json_float(self.objective),
            "simulated_step_time": _json_float(self.simulated_step_time),
            "t_max": _json_float(self.t_max),
            "strategy": self.strategy,
            "cost_model": self.cost_model,
            "extra": _jsonable(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicingPlan:
        missing = [k for k in ("token_slices", "batch_slices") if k not in data]
        if missing:
            raise ValueError(f"a slicing plan needs {missing}; got keys {sorted(data)}")
        return cls(
            token_slices=tuple(data["token_slices"]),
            batch_slices=tuple(data["batch_slices"]),
            predicted_step_time=_float(data.get("predicted_step_time", math.nan)),
            t_max=_float(data.get("t_max", math.nan)),
            strategy=str(data.get("strategy", "")),
            cost_model=str(data.get("cost_model", "")),
            extra=dict(data.get("extra", {})),
            objective=_float(data.get("objective", math.nan)),
            simulated_step_time=_float(data.get("simulated_step_time", math.nan)),
        )


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _json_float(value: float) -> float | None:
    # JSON has no NaN/inf; None round-trips through _float as NaN.
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return _json_float(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def format_plan(plan: SlicingPlan, width: int = 48) -> str:
    """Megatron's argument-print layout, so the plan reads like the rest of a start-up log."""
    rows: list[tuple[str, Any]] = [
        ("strategy", plan.strategy),
        ("cost_model", plan.cost_model),
        ("token_slices", list(plan.token_slices)),
        ("num_token_slices", plan.num_token_slices),
        ("token_slice_offsets", list(slice_offsets(plan.token_slices))),
        ("batch_slices", list(plan.batch_slices)),
        ("predicted_step_time", plan.predicted_step_time),
        ("objective", plan.objective),
        ("t_max", plan.t_max),
    ]
    if plan.simulated:
        rows.append(("simulated_step_time", plan.simulated_step_time))
    rows += [(str(k), v) for k, v in plan.extra.items()]
    lines = [f"{'-' * 24}{PLAN_TITLE}{'-' * 24}"]
    for name, value in sorted(rows, key=lambda row: row[0].lower()):
        dots = "." * max(1, width - len(name))
        lines.append(f"  {name} {dots} {_fmt(value)}")
    lines.append(f"{'-' * 20} end of{PLAN_TITLE}{'-' * 21}")
    return "\n".join(lines)
