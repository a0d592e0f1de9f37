"""terapipe-plan (docs/latency_table.md for its tables) and the simulator-scored planning option."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from megatron_terapipe.slicing import AnalyticCostModel, make_plan
from megatron_terapipe.slicing.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_has_the_contract_keys(capsys):
    code, out, _ = run_cli(
        capsys, "--model", "gpt3-175b", "--tensor-model-parallel-size", "8",
        "--pipeline-model-parallel-size", "48", "--batch-size", "2", "--granularity", "8",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    for key in ("token_slices", "batch_slices", "predicted_step_time", "t_max"):
        assert key in data
    assert sum(data["token_slices"]) == 2048 and sum(data["batch_slices"]) == 2
    assert all(x % 8 == 0 for x in data["token_slices"])
    assert data["t_max"] < data["predicted_step_time"]


def test_cli_text_output_and_compare(capsys):
    code, out, _ = run_cli(capsys, "--model", "gpt3-1b", "--pipeline-model-parallel-size", "24",
                           "--granularity", "64", "--compare")
    assert code == 0
    assert "token pipeline plan" in out and "equal-flops: predicted_step_time" in out


def test_cli_latency_table_splits_the_whole_batch(capsys, tmp_path):
    rng = np.random.default_rng(7)
    units, batch = 6, 3
    table = np.full((batch + 1, units + 1, units + 1), np.inf)
    for b in range(1, batch + 1):
        for n in range(1, units + 1):
            for c in range(units - n + 1):
                # Batching is cheaper per sequence: the batch DP should keep sequences together.
                table[b, n, c] = (0.5 + 0.5 * b) * (1 + n + 0.1 * n * c) + rng.random() * 0.01
    np.savez(tmp_path / "lat.npz", latency=table, granularity=16, seq_length=units * 16)
    code, out, _ = run_cli(capsys, "--latency-table", str(tmp_path / "lat.npz"),
                           "--pipeline-model-parallel-size", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert sum(data["batch_slices"]) == batch
    assert sum(data["token_slices"]) == 96 and data["cost_model"] == "table:lat.npz"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt3-1b", "--granularity", "7"],
         "--granularity=7 does not divide seq_length=2048"),
        (["--num-layers", "4"], "model flags incomplete: give --hidden-size"),
        ([], "no cost model"),
        (["--model", "gpt3-1b", "--memory-cap", "0.01"], "no plan fits: smallest needs"),
        (["--model", "gpt3-1b", "--cost-model", "nope"], "--cost-model='nope'"),
    ],
)
def test_cli_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.startswith("terapipe-plan: error:")


def test_cli_bad_latency_table(capsys, tmp_path):
    table = np.ones((2, 5, 5))
    table[1, 2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", latency=table, granularity=4, seq_length=16)
    np.savez(tmp_path / "shape.npz", latency=np.ones((2, 5, 5)), granularity=4, seq_length=32)
    for name, message in (("nan.npz", "holds NaN"), ("shape.npz", "needs [B+1, 9, 9]")):
        code, _, err = run_cli(capsys, "--latency-table", str(tmp_path / name))
        assert code == 2 and message in err and name in err


def test_cli_writes_a_table_it_can_read_back(capsys, tmp_path):
    base = ["--model", "gpt3-13b", "--pipeline-model-parallel-size", "40",
            "--tensor-model-parallel-size", "8", "--granularity", "128", "--json"]
    code, out, _ = run_cli(capsys, *base, "--write-table", str(tmp_path / "w.npz"))
    first = json.loads(out)
    code, out, _ = run_cli(capsys, "--latency-table", str(tmp_path / "w.npz"),
                           "--pipeline-model-parallel-size", "40", "--json")
    again = json.loads(out)
    assert code == 0 and again["token_slices"] == first["token_slices"]
    assert again["predicted_step_time"] == pytest.approx(first["predicted_step_time"])


# -- simulator scoring ------------------------------------------------------------------------
@pytest.fixture
def fake_simulator(monkeypatch):
    """A stand-in for megatron_terapipe.schedules/simulate with the agreed API, whose makespan is
    TeraPipe's formula: simulator scoring must then find the DP's optimum again."""
    calls = []

    class Costs:
        def __init__(self, model, batch):
            self.model, self.batch = model, batch

        @classmethod
        def from_stage_cost_model(cls, model, batch=1, backward_ratio=2.0, num_chunks=1):
            return cls(model, batch)

    def build_schedule(name, num_stages, num_microbatches, num_token_slices, num_chunks=1,
                       split_backward=False):
        return types.SimpleNamespace(name=name, stages=num_stages, micro=num_microbatches)

    def simulate(schedule, token_slices, costs):
        calls.append(tuple(token_slices))
        times, context = [], 0
        for n in token_slices:
            times.append(costs.model.forward_backward_time(costs.batch, n, context)
                         + 2 * costs.model.p2p_time(costs.batch, n))
            context += n
        step = schedule.micro * sum(times) + (schedule.stages - 1) * max(times)
        return types.SimpleNamespace(step_time=step)

    schedules = types.ModuleType("megatron_terapipe.schedules")
    schedules.build_schedule = build_schedule
    simulate_mod = types.ModuleType("megatron_terapipe.simulate")
    simulate_mod.ActionCosts, simulate_mod.simulate = Costs, simulate
    monkeypatch.setitem(sys.modules, "megatron_terapipe.schedules", schedules)
    monkeypatch.setitem(sys.modules, "megatron_terapipe.simulate", simulate_mod)
    return calls


def test_simulator_scoring_uses_the_simulator_api(fake_simulator):
    model = AnalyticCostModel.from_preset("v100", num_layers=48, hidden_size=6144,
                                          num_attention_heads=48, tensor_model_parallel_size=8,
                                          pipeline_model_parallel_size=24)
    kw = dict(seq_length=2048, num_stages=24, batch=1, granularity=32, batch_mode="fixed",
              num_microbatches=2, schedule="token-1f1b")
    formula = make_plan(model, **kw)
    scored = make_plan(model, score="simulator", **kw)
    assert len(fake_simulator) > 10
    assert scored.extra["score"] == "simulator"
    assert scored.predicted_step_time == pytest.approx(formula.predicted_step_time, rel=1e-12)
    assert scored.objective == pytest.approx(scored.predicted_step_time)
    assert scored.simulated_step_time == scored.predicted_step_time
    assert formula.objective == formula.predicted_step_time and not formula.simulated


def test_simulator_scoring_reports_a_missing_simulator(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_terapipe.simulate", None)
    model = AnalyticCostModel(num_layers=2, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="scoring with the simulator needs"):
        make_plan(model, seq_length=64, num_stages=2, granularity=16, score="simulator")


def test_simulator_scoring_with_the_real_simulator():
    from megatron_terapipe import simulate
    if not hasattr(simulate, "simulate"):
        pytest.skip("simulator not available")
    from megatron_terapipe.slicing.strategies import simulator_scorer

    model = AnalyticCostModel.from_preset("v100", num_layers=8, hidden_size=2048,
                                          num_attention_heads=16, pipeline_model_parallel_size=4)
    for schedule in ("terapipe", "token-1f1b"):
        kw = dict(seq_length=512, num_stages=4, batch=1, granularity=32, batch_mode="fixed",
                  num_microbatches=2, schedule=schedule)
        formula = make_plan(model, **kw)
        scored = make_plan(model, score="simulator", **kw)
        sim = simulator_scorer(model, schedule, 4, 2, 1)
        assert scored.predicted_step_time == pytest.approx(sim(scored.token_slices))
        # The formula's optimum is among the candidates, so simulating can only do better.
        assert scored.predicted_step_time <= sim(formula.token_slices) + 1e-12


# -- impossible values are refused up front, naming the flag (issue 14) ------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny", "--hidden-size", "0"], "--hidden-size=0 must be >= 1"),
        (["--model", "tiny", "--batch-size", "0"], "--batch-size=0 must be >= 1"),
        (["--model", "tiny", "--seq-length", "0"], "--seq-length=0 must be >= 1"),
        (["--model", "tiny", "--num-layers", "-2"], "--num-layers=-2 must be >= 1"),
        (["--model", "tiny", "--pipeline-model-parallel-size", "0"],
         "--pipeline-model-parallel-size=0 must be >= 1"),
        (["--model", "tiny", "--memory-cap", "0"], "--memory-cap=0.0 must be > 0"),
        (["--model", "tiny", "--efficiency", "1.5"],
         "--efficiency=1.5 is a fraction of peak: 0 < e <= 1"),
    ],
)
def test_impossible_values_name_the_flag(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err == f"terapipe-plan: error: {message}\n"


def test_output_directory_is_checked_before_profiling(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "profile.json"
    code, _, err = run_cli(capsys, "--model", "tiny", "--cost-model", "profile",
                           "--profile-out", str(missing))
    assert code == 2
    assert err == (f"terapipe-plan: error: --profile-out {missing}: directory "
                   f"{missing.parent} does not exist\n")


def test_non_npz_latency_table_is_named(capsys, tmp_path):
    bogus = tmp_path / "table.npz"
    bogus.write_text("not a zip archive")
    code, _, err = run_cli(capsys, "--latency-table", str(bogus))
    assert code == 2
    assert err == (f"terapipe-plan: error: --latency-table {bogus} is not an .npz latency table "
                   "(a numpy.savez archive; format in docs/latency_table.md)\n")
    # The loader itself names the file too (the planner's --token-pipeline-cost-model path).
    from megatron_terapipe.slicing.latency_table import LatencyTableCostModel

    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="array.npy' is a single .npy array"):
        LatencyTableCostModel.load(tmp_path / "array.npy")


def test_product_text_points_only_at_files_in_the_repository():
    import os

    from megatron_terapipe.slicing.cli import build_parser

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = build_parser().format_help()
    assert "DESIGN.md" not in text
    assert "docs/latency_table.md" in text
    assert os.path.isfile(os.path.join(repo, "docs", "latency_table.md"))
