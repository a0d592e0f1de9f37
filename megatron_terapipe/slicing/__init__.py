"""Token and batch slicing for the token pipeline: cost models, TeraPipe's DP, the plan.

Nothing here imports torch or megatron-core at import time (the profiler and the broadcast
import them when called), so `terapipe-plan` starts fast and runs without a GPU.
"""

from megatron_terapipe.slicing.cost_models import (
    DEVICE_PRESETS,
    AnalyticCostModel,
    DevicePreset,
    StageCostModel,
    build_latency_table,
)
from megatron_terapipe.slicing.dp import DPSolution, NoFeasiblePlan, solve, step_objective
from megatron_terapipe.slicing.latency_table import (
    LatencyTableCostModel,
    validate_latency_table,
)
from megatron_terapipe.slicing.megatron_args import (
    broadcast_plan,
    cost_model_from_args,
    parse_token_pipeline_slices,
    plan_and_broadcast,
    plan_from_args,
)
from megatron_terapipe.slicing.memory import ActivationMemoryModel
from megatron_terapipe.slicing.plan import SlicingPlan, format_plan
from megatron_terapipe.slicing.planner import (
    check_granularity,
    default_granularity,
    make_plan,
    predict_step_time,
)
from megatron_terapipe.slicing.profiled import ProfiledCostModel
from megatron_terapipe.slicing.profiler import (
    ProfileGrid,
    default_grid,
    measure_fn_for_megatron_stage,
    profile_stage,
)
from megatron_terapipe.slicing.strategies import equal_flops_slices

__all__ = [
    "DEVICE_PRESETS",
    "ActivationMemoryModel",
    "AnalyticCostModel",
    "DPSolution",
    "DevicePreset",
    "LatencyTableCostModel",
    "NoFeasiblePlan",
    "ProfileGrid",
    "ProfiledCostModel",
    "SlicingPlan",
    "StageCostModel",
    "broadcast_plan",
    "build_latency_table",
    "check_granularity",
    "cost_model_from_args",
    "default_granularity",
    "default_grid",
    "equal_flops_slices",
    "format_plan",
    "make_plan",
    "measure_fn_for_megatron_stage",
    "parse_token_pipeline_slices",
    "plan_and_broadcast",
    "plan_from_args",
    "predict_step_time",
    "profile_stage",
    "solve",
    "step_objective",
    "validate_latency_table",
]
