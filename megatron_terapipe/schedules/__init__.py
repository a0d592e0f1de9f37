"""Schedules as data: per-rank action lists, their generators and their validator.

The executor (`schedules/executor.py` and the step modules it drives) runs these lists on
Megatron and the simulator (`megatron_terapipe.simulate`) runs them on a cost model; both read
the same IR.
"""

from megatron_terapipe.schedules.communication import attach_communication, virtual_stage
from megatron_terapipe.schedules.generators import (
    SCHEDULES,
    STOCK_SCHEDULES,
    TOKEN_SCHEDULES,
    build_schedule,
    schedule_from_orders,
    split_backward_orders,
)
from megatron_terapipe.schedules.ir import (
    BACKWARD,
    FORWARD,
    WEIGHT_GRAD,
    Action,
    CommGroup,
    Compute,
    Kind,
    P2POp,
    Schedule,
    Wait,
)
from megatron_terapipe.schedules.network import match_messages, run_network
from megatron_terapipe.schedules.validator import ScheduleError, find_problems, validate_schedule

__all__ = [
    "BACKWARD",
    "FORWARD",
    "WEIGHT_GRAD",
    "SCHEDULES",
    "STOCK_SCHEDULES",
    "TOKEN_SCHEDULES",
    "Action",
    "CommGroup",
    "Compute",
    "Kind",
    "P2POp",
    "Schedule",
    "ScheduleError",
    "attach_communication",
    "build_schedule",
    "schedule_from_orders",
    "split_backward_orders",
    "find_problems",
    "match_messages",
    "run_network",
    "validate_schedule",
    "Wait",
    "virtual_stage",
]
