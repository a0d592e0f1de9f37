"""The seams between this package and what it runs on.

- `cpu`: stock megatron-core on CPU with the gloo backend. megatron-core assumes CUDA in a
  handful of places (`applied_patches()` lists them); every remap needed to run its models,
  schedules, DDP and optimizer on CPU lives there, so the rest of the project stays
  device-agnostic. Nothing is changed until `enable_cpu()` is called.
- `megatron_core`: the API differences between the megatron-core releases supported
  (0.16.1-0.19.x), each bridged once.
- `sdpa_ops`: the private aten attention ops prefix attention calls, pinned by schema.
"""

from megatron_terapipe.compat.cpu import cpu_enabled, enable_cpu
from megatron_terapipe.compat.spawn import DistributedRunError, run_distributed

__all__ = ["enable_cpu", "cpu_enabled", "run_distributed", "DistributedRunError"]
