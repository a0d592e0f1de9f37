"""Make stock megatron-core usable on CPU with the gloo backend.

megatron-core 0.16 assumes CUDA in a handful of places (`applied_patches()` lists them). Every
remap needed to run its models, schedules, DDP and optimizer on CPU lives here, so the rest of
the project stays device-agnostic. Nothing is changed until `enable_cpu()` is called.
"""

from megatron_terapipe.compat.cpu import cpu_enabled, enable_cpu
from megatron_terapipe.compat.spawn import DistributedRunError, run_distributed

__all__ = ["enable_cpu", "cpu_enabled", "run_distributed", "DistributedRunError"]
