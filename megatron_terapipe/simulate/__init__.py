"""Simulation of schedules on cost models, timelines, traces and Gantt charts.

Pure Python (numpy-free even); matplotlib is imported only when a plot is drawn.
"""

from megatron_terapipe.simulate.costs import ActionCosts
from megatron_terapipe.simulate.plot import plot_timelines
from megatron_terapipe.simulate.simulator import P2P_MODES, SimulationResult, simulate
from megatron_terapipe.simulate.timeline import Timeline, TimelineEvent

__all__ = [
    "P2P_MODES",
    "ActionCosts",
    "SimulationResult",
    "Timeline",
    "TimelineEvent",
    "plot_timelines",
    "simulate",
]
