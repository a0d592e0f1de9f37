"""The DP's objective equals the exhaustive optimum on small random latency tables.

The exhaustive search shares no code with the DP: it lists every composition of the units for
every batch-slice size, keeps each size's Pareto front of (Σ t, max t), and tries every
batch partition against every combination of front points.
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_terapipe.slicing.dp import NoFeasiblePlan, solve, step_objective


def compositions(n: int):
    for mask in range(1 << (n - 1)):
        parts, last = [], 0
        for i in range(1, n):
            if mask >> (i - 1) & 1:
                parts.append(i - last)
                last = i
        parts.append(n - last)
        yield tuple(parts)


def partitions(n: int, largest: int | None = None):
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for p in range(min(n, largest), 0, -1):
        for rest in partitions(n - p, p):
            yield (p,) + rest


def slicing_stats(table, b, comp):
    times, context = [], 0
    for length in comp:
        times.append(float(table[b, length, context]))
        context += length
    return sum(times), max(times)


def pareto(points):
    points = sorted(set(points))
    front = []
    for p in points:
        if not any(q[0] <= p[0] and q[1] <= p[1] for q in front):
            front.append(p)
    return front


def exhaustive(table, stages, mode, batch, fixed=None):
    units = table.shape[1] - 1
    stats = {
        b: [slicing_stats(table, b, comp) for comp in compositions(units)]
        for b in range(1, table.shape[0])
    }
    best = np.inf

    def consider(total, worst):
        nonlocal best
        if np.isfinite(total):
            best = min(best, total + (stages - 1) * worst)

    if mode == "free":
        fronts = {b: pareto(s) for b, s in stats.items()}
        for parts in partitions(batch):
            for combo in itertools.product(*(fronts[b] for b in parts)):
                consider(sum(c[0] for c in combo), max(c[1] for c in combo))
    elif mode == "uniform":
        for b in range(1, batch + 1):
            if batch % b == 0:
                for total, worst in stats[b]:
                    consider(batch // b * total, worst)
    else:  # fixed: every copy of a size runs the same slicing
        sizes = sorted(set(fixed))
        for combo in itertools.product(*(stats[b] for b in sizes)):
            count = [fixed.count(b) for b in sizes]
            consider(sum(n * c[0] for n, c in zip(count, combo)), max(c[1] for c in combo))
    return best


def random_table(rng, units, batch, integer=True, inf_fraction=0.0):
    shape = (batch + 1, units + 1, units + 1)
    table = rng.integers(1, 40, size=shape).astype(float) if integer else rng.random(shape)
    if inf_fraction:
        table[rng.random(shape) < inf_fraction] = np.inf
    return table


def dp_objective(table, stages, **kw):
    try:
        return solve(table, stages, **kw).objective
    except NoFeasiblePlan:
        return np.inf


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mode", ["free", "uniform"])
def test_dp_matches_exhaustive_integer_tables(seed, mode):
    rng = np.random.default_rng(seed)
    units, batch = int(rng.integers(1, 11)), int(rng.integers(1, 4))
    if mode == "free" and batch == 3:
        units = min(units, 8)  # keeps the partition x front product small
    stages = int(rng.integers(1, 50))
    table = random_table(rng, units, batch)
    want = exhaustive(table, stages, mode, batch)
    for method in ("bisect", "ascending"):
        sol = solve(table, stages, batch_mode=mode, method=method)
        assert sol.objective == want
        # The reported slicing really has the reported objective.
        got, _, worst = step_objective(table, stages, sol.batch_slices, sol.token_units)
        assert got == want and worst == sol.t_max
        assert sum(sol.batch_slices) == batch
        assert all(sum(u) == units for u in sol.token_units)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    units=st.integers(1, 10),
    batch=st.integers(1, 3),
    stages=st.integers(1, 64),
    inf_fraction=st.sampled_from([0.0, 0.15]),
)
def test_dp_matches_exhaustive_float_tables(seed, units, batch, stages, inf_fraction):
    rng = np.random.default_rng(seed)
    if batch == 3:
        units = min(units, 7)
    table = random_table(rng, units, batch, integer=False, inf_fraction=inf_fraction)
    want = exhaustive(table, stages, "free", batch)
    got = dp_objective(table, stages)
    if np.isinf(want):
        assert np.isinf(got)
    else:
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_dp_matches_exhaustive_fixed_microbatches(seed):
    rng = np.random.default_rng(100 + seed)
    units, stages = int(rng.integers(1, 10)), int(rng.integers(1, 30))
    table = random_table(rng, units, 2)
    fixed = tuple(int(x) for x in rng.integers(1, 3, size=int(rng.integers(1, 5))))
    want = exhaustive(table, stages, "fixed", None, fixed=fixed)
    assert solve(table, stages, batch_mode="fixed", batch_slices=fixed).objective == want


def test_infeasible_table_raises():
    table = np.full((2, 4, 4), np.inf)
    with pytest.raises(NoFeasiblePlan):
        solve(table, 4)


def _cli_plan(capsys, argv):
    from megatron_terapipe.slicing import cli

    assert cli.main(argv) == 0
    return capsys.readouterr().out


def _objective_from_file(path, plan, stages):
    """TeraPipe's T = Σ t + (K−1)·max t of the printed plan, read straight from the .npz: each
    unit's latency[b, l, c] (plus twice its P2P, as the planner prices a slice's send and
    receive), over every batch slice with its own token slicing."""
    with np.load(path) as data:
        latency, g = data["latency"], int(data["granularity"])
        p2p = data["p2p"] if "p2p" in data else np.zeros(latency.shape[:2])
    per = plan["extra"].get("token_slices_per_batch_slice") or [plan["token_slices"]] * len(
        plan["batch_slices"]
    )
    times = []
    for b, slices in zip(plan["batch_slices"], per):
        context = 0
        for length in slices:
            times.append(latency[b, length // g, context // g] + 2 * p2p[b, length // g])
            context += length
    return sum(times) + (stages - 1) * max(times)


def _measured_like_table(rng, units, batch):
    """t(b, l, c) = b·(fixed + α·l + β·l·c), ±15 % noise: equal slicings compete with the
    DP's, so the simulator sometimes keeps another plan than the formula's optimum."""
    b, n, c = np.meshgrid(*(np.arange(k + 1) for k in (batch, units, units)), indexing="ij")
    fixed, alpha, beta = rng.random(3) * [3.0, 2.0, 0.3]
    return b * (fixed + alpha * n + beta * n * c) * (0.85 + 0.3 * rng.random(b.shape))


@pytest.mark.parametrize("score", ["formula", "simulator"])
def test_terapipe_plan_prints_the_objective_of_the_plan_it_prints(tmp_path, capsys, score):
    """20 random tables through the CLI: the printed objective is the printed plan's, whatever
    the score; with the formula it is also the exhaustive optimum; with the simulator the
    simulated time is printed apart, and the DP's optimum, printed beside a plan the simulator
    preferred, is the exhaustive one."""
    kept_other = 0
    for seed in range(20):
        rng = np.random.default_rng(500 + seed)
        units, batch = int(rng.integers(3, 9)), int(rng.integers(1, 4))
        if batch == 3 and score == "formula":
            units = min(units, 6)  # the exhaustive free-batch search grows fast
        g, stages = int(rng.choice([1, 8])), int(rng.integers(2, 9))
        if seed % 2:
            latency = _measured_like_table(rng, units, batch)
        else:
            latency = random_table(rng, units, batch, integer=False) * 30
        arrays = dict(latency=latency, granularity=g, seq_length=units * g)
        if seed % 3 == 0:
            arrays["p2p"] = rng.random(latency.shape[:2]) * 0.5
        path = str(tmp_path / f"t{seed}.npz")
        np.savez(path, **arrays)
        argv = ["--latency-table", path, "--pipeline-model-parallel-size", str(stages),
                "--score", score]  # fmt: skip
        mode, fixed = ("uniform", None) if score == "simulator" else ("free", None)
        if score == "simulator" and seed % 4 >= 2:  # two micro-batches of one sequence
            argv += ["--batch-mode", "fixed", "--batch-size", "1", "--num-microbatches", "2"]
            mode, fixed = "fixed", (1, 1)
        plan = json.loads(_cli_plan(capsys, [*argv, "--json"]))
        want = _objective_from_file(path, plan, stages)
        assert plan["objective"] == pytest.approx(want, rel=1e-12), (seed, plan)
        text = _cli_plan(capsys, argv)
        rows = dict(re.findall(r"^  (\S+) \.+ (.*)$", text, re.M))
        assert float(rows["objective"]) == pytest.approx(want, rel=1e-5), (seed, text)
        table = latency + 2 * arrays.get("p2p", np.zeros(latency.shape[:2]))[:, :, None]
        optimum = exhaustive(table[: (1 if fixed else batch) + 1], stages, mode, batch, fixed)
        if score == "formula":
            assert plan["simulated_step_time"] is None and "simulated_step_time" not in rows
            assert plan["predicted_step_time"] == plan["objective"]
            assert plan["objective"] == pytest.approx(optimum, rel=1e-12)
        else:
            assert plan["predicted_step_time"] == plan["simulated_step_time"]
            assert float(rows["simulated_step_time"]) == pytest.approx(
                plan["simulated_step_time"], rel=1e-5
            )
            dp = plan["extra"].get("dp_objective", plan["objective"])
            assert dp == pytest.approx(optimum, rel=1e-12)
            assert plan["objective"] >= optimum * (1 - 1e-12)
            kept_other += "dp_objective" in plan["extra"]
    if score == "simulator":  # the case of the report: the simulator kept another plan
        assert kept_other >= 2, kept_other
