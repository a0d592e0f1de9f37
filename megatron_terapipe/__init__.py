"""megatron-terapipe: TeraPipe token-level pipeline parallelism for Megatron (megatron-core).

Public API (README.md, docs/token_pipeline.md). Heavy imports (megatron-core, torch) happen on
first use so that the pure-Python tools (`terapipe-simulate`, `terapipe-plan`) start fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TokenPipelineConfig": "megatron_terapipe.config",
    "token_pipeline_layer_spec": "megatron_terapipe.model",
    "get_forward_backward_func": "megatron_terapipe.schedules.executor",
    "add_token_pipeline_args": "megatron_terapipe.arguments",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_terapipe' has no attribute {name!r}")
