"""Reference models, data and comparison helpers for tests, benchmarks and the demo.

These build stock megatron-core GPT models the same way for every parallel layout, so a run
under any schedule can be compared, parameter by parameter, with a single-process reference.
"""
