"""compare_schedules.py end to end on a tiny model: one table's worth of JSON, sane values."""

import importlib.util
import io
import json
import os
import statistics
from contextlib import redirect_stdout

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("trace") / "t")
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = _script("compare_schedules").main([
            "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "64", "--num-microbatches", "2", "--num-token-slices", "4",
            "--warmup", "1", "--iterations", "2", "--json", "--trace", trace,
            "--timeout", "120",
        ])
    assert code == 0
    return json.loads(buffer.getvalue())


def test_every_schedule_has_a_row(output):
    names = [r["schedule"] for r in output["results"]]
    assert names[0] == "stock 1F1B"
    assert "stock 1F1B, local attention" in names
    for order in ("terapipe", "token-1f1b"):
        assert f"{order} S=4" in names and f"{order} DP-planned" in names
        assert f"{order} auto" in names


def test_planned_rows_show_the_planners_prediction(output):
    """auto = the product's planner (default cost model), DP-planned = the warm-up fit's DP;
    both carry the planner's predicted step time next to the measured one."""
    for row in output["results"]:
        planned = row["planned_by"]
        assert planned == ("auto" if row["schedule"].endswith(" auto") else
                           "fit" if row["schedule"].endswith("DP-planned") else None)
        if planned is None:
            assert row["planner_predicted_step_time"] is None
            continue
        assert row["planner_predicted_step_time"] > 0
        assert row["planner_error"] == pytest.approx(
            row["planner_predicted_step_time"] / row["step_time"] - 1)
        if planned == "auto":
            assert row["plan_cost_model"] == "profile:start-up"


def test_baseline_is_stock_1f1b_on_the_token_pipelines_kernel(output):
    rows = output["results"]
    assert output["baseline"] == "stock 1F1B"
    assert [r["baseline"] for r in rows] == [True] + [False] * (len(rows) - 1)
    assert rows[0]["kind"] == "stock-1f1b" and rows[0]["attention"] == "sdpa"
    kernels = {r["schedule"]: r["attention"] for r in rows}
    assert kernels["stock 1F1B, local attention"] == "local"
    assert {kernels[r["schedule"]] for r in rows if r["kind"] == "token"} == {"sdpa"}
    # Stock interleaving at PP = 2 (overlapped P2P): a row on the same kernel, its losses those
    # of stock 1F1B (same weights and data).
    assert kernels["stock interleaved V=2"] == "sdpa"
    interleaved = next(r for r in rows if r["schedule"] == "stock interleaved V=2")
    assert interleaved["max_loss_diff"] < 1e-5
    for row in rows:
        assert row["attention_kernel"]  # described in words
        # the median of the per-round speedups (rounds interleaved, round i against round i)
        ratios = [b / t for b, t in zip(rows[0]["step_times"], row["step_times"])]
        assert row["speedup"] == pytest.approx(statistics.median(ratios))
        assert row["verdict"] in (("baseline",) if row["baseline"] else ("faster", "slower", "tie"))
        assert row["step_time_min"] <= row["step_time"] <= row["step_time_max"]


def test_time_breakdown_adds_up_to_the_span(output):
    for row in output["results"]:
        for compute, comm, idle in zip(row["compute_s"], row["comm_wait_s"], row["idle_s"]):
            assert compute > 0 and comm >= 0 and idle >= 0
            assert compute + comm + idle == pytest.approx(row["measured_span"], rel=1e-6)
        assert len(row["inflation"]) == 2


def test_row_values(output):
    keys = {"schedule", "step_time", "tokens_per_s", "speedup", "bubble_measured",
            "bubble_simulated", "peak_activation_mib", "predicted_step_time",
            "prediction_error", "max_loss_diff"}
    for row in output["results"]:
        assert keys <= set(row)
        assert row["step_time"] > 0 and row["predicted_step_time"] > 0
        assert len(row["bubble_measured"]) == len(row["bubble_simulated"]) == 2
        assert all(0.0 <= b <= 1.0 for b in row["bubble_measured"] + row["bubble_simulated"])
        assert all(m > 0 for m in row["peak_activation_mib"])
        assert row["max_loss_diff"] < 1e-5, row["schedule"]  # same weights, same data
    assert output["results"][0]["speedup"] == 1.0


def test_planned_slices_cover_the_sequence(output):
    for row in output["results"]:
        assert sum(row["token_slices"]) == 64


def test_traces_hold_every_action_with_its_microbatch(output):
    assert len(output["traces"]) == len(output["results"])
    for path in output["traces"]:
        with open(path) as handle:
            events = [e for e in json.load(handle)["traceEvents"] if e["ph"] == "X"]
        compute = [e for e in events if e["cat"] in ("forward", "backward")]
        assert compute and all(e["args"]["microbatch"] >= 0 for e in compute), path


def test_model_flags_are_pretrain_gpts():
    """pretrain_gpt.py's model flags shape the benchmark model through its own validation;
    its training-only flags are ignored; flags it does not know are errors."""
    script = _script("compare_schedules")
    args = script.parse_args(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
                              "4", "--ffn-hidden-size", "96", "--swiglu", "--seq-length", "32",
                              "--global-batch-size", "4", "--lr", "3e-4"])
    spec = script.build_spec(args)
    assert spec.num_microbatches == 4
    assert spec.model.ffn_hidden_size == 96 and spec.model.swiglu
    assert spec.model.padded_vocab_size == 256  # pretrain_gpt.py's padding of 128 + EOD
    assert args.ignored_flags == ["--lr"]
    # Fusion shapes the step (one GEMM into main_grad per weight): on unless turned off, as in
    # pretrain_gpt.py, and the trainer's flag reaches the benchmark model.
    assert spec.model.gradient_accumulation_fusion
    unfused = script.parse_args(["--num-layers", "4", "--no-gradient-accumulation-fusion"])
    assert unfused.ignored_flags == []
    assert not script.build_spec(unfused).model.gradient_accumulation_fusion
    with pytest.raises(SystemExit):
        script.parse_args(["--no-such-flag", "1"])
    with pytest.raises(SystemExit, match="--num-layers=6 is not divisible"):
        script.build_spec(script.parse_args(["--num-layers", "6", "--pipeline-model-parallel-size",
                                             "4"]))


def test_seq1f1b_equal_flops_rows_beside_the_equal_rows(output):
    """Each order runs Seq1F1B's split of the same S right after the equal row: later slices
    shorter, FLOPs per slice (the analytic model's count) more even than equal lengths give."""
    from megatron_terapipe.slicing.cost_models import AnalyticCostModel

    model = AnalyticCostModel(num_layers=4, hidden_size=32, num_attention_heads=4)
    names = [r["schedule"] for r in output["results"]]
    rows = {r["schedule"]: r for r in output["results"]}

    def spread(slices):
        flops = [float(model.forward_flops(1, n, sum(slices[:i]))) for i, n in enumerate(slices)]
        return max(flops) / min(flops)

    for order in ("terapipe", "token-1f1b"):
        peer = rows[f"{order} equal-flops S=4"]
        assert names.index(f"{order} equal-flops S=4") == names.index(f"{order} S=4") + 1
        assert peer["slicing_strategy"] == "equal-flops" and rows[f"{order} S=4"][
            "slicing_strategy"] == ""
        slices = peer["token_slices"]
        assert sum(slices) == 64 and len(slices) == 4
        assert slices == sorted(slices, reverse=True) and slices[0] > slices[-1]
        assert spread(slices) < spread(rows[f"{order} S=4"]["token_slices"])


def test_verdict_intervals_are_the_per_round_speedups(output):
    """Two rounds are too few to set one aside: the interval is the range of the per-round
    speedups over the baseline."""
    base = next(r for r in output["results"] if r["baseline"])
    for row in output["results"]:
        assert row["rounds_set_aside"] == 0
        if row["baseline"]:
            assert row["speedup_low"] is None and row["speedup"] == 1.0
            continue
        ratios = [b / t for b, t in zip(base["step_times"], row["step_times"])]
        assert (row["speedup_low"], row["speedup_high"]) == (min(ratios), max(ratios))
