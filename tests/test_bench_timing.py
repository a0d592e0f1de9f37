"""Stock and token rows are timed by the same clock and instrumented alike (benchmark harness).

The stock rows are the baseline of every speedup. Synchronising the device around each stock
action while the token executor records events and synchronises once per step would stall the
GPU between the stock schedule's kernels only, and inflate the "same kernel" gain. On the CPU a
synchronisation costs nothing, so the check counts them: `timing.device_synchronize` is what
every clock of the package waits through.
"""

from __future__ import annotations

import importlib.util
import os

from bench_timing_ranks import step_instrumentation

from megatron_terapipe.compat import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_spec():
    spec = importlib.util.spec_from_file_location(
        "bench_step", os.path.join(ROOT, "scripts", "bench_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "64", "--microbatch-counts", "2", "--num-token-slices", "2",
        "--schedules", "token-1f1b", "--no-auto", "--no-local-attention",
    ])
    return bench.spec_for(args, 2)


def test_stock_and_token_steps_synchronise_alike_and_carry_one_range_per_action():
    per_rank = run_distributed(step_instrumentation, 2, _tiny_spec(), timeout_s=240)
    for rank, variants in enumerate(per_rank):
        stock = variants["stock 1F1B"]
        token = variants["token-1f1b S=2"]
        # Per-action synchronisation would make these grow with the actions (stock: 2 computes
        # per micro-batch plus its sends/receives; token: twice the computes at S = 2).
        assert stock["computes"] == 4 and token["computes"] == 8, (rank, stock, token)
        # Harness: the clock read before and after the call; StepClock: start and finish.
        assert stock["synchronisations"] == token["synchronisations"] == 4, (rank, stock, token)
        for name, row in variants.items():
            # One `pipeline <kind> m<m> t<t> v<v>` range per recorded action, on both sides.
            assert row["ranges"] == row["record_ranges"], (rank, name)
            assert any(r.startswith("pipeline F m0") for r in row["ranges"]), (rank, name)
            assert any(r.startswith("pipeline B m1") for r in row["ranges"]), (rank, name)
            assert "pipeline comm" in row["ranges"], (rank, name)
