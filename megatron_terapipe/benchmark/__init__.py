"""Benchmarks of stock megatron-core schedules against the token pipeline, on one machine.

Everything here is measurement tooling for `scripts/bench_step.py` and
`scripts/compare_schedules.py`. The instrumentation it installs (wrappers around megatron-core's
`forward_step`/`backward_step`, saved-tensor hooks, a KV-store observer) is active only inside a
benchmark step and removed afterwards; training code never runs with it.
"""

from megatron_terapipe.benchmark.spec import BenchSpec, Variant

__all__ = ["BenchSpec", "Variant"]
