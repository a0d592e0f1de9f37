"""terapipe-simulate: output keys, files it writes, and the errors it gives for bad input."""

from __future__ import annotations

import json

import pytest

from megatron_terapipe.simulate.cli import main


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on one line
    return json.loads(out)


def run_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_json_keys_and_values(capsys):
    data = run_json(
        capsys,
        "--schedule",
        "token-1f1b",
        "--pipeline-model-parallel-size",
        "4",
        "--num-microbatches",
        "2",
        "--num-token-slices",
        "4",
        "--cost-model",
        "uniform",
    )
    for key in ("step_time", "bubble_fraction", "peak_activations", "mean_bubble_fraction"):
        assert key in data
    assert data["schedule"] == "token-1f1b" and data["valid"] is True
    assert data["token_slices"] == [512] * 4 and data["seq_length"] == 2048
    assert data["step_time"] == 3 * (4 * 2 + 3)
    assert data["bubble_fraction"] == pytest.approx([3 / 11] * 4)
    assert data["peak_activations"] == [7, 6, 5, 4]
    assert data["peak_activation_bytes"] is None


def test_explicit_token_slices_set_the_sequence_length(capsys):
    data = run_json(
        capsys,
        "--schedule",
        "terapipe",
        "--token-slices",
        "300,200,100,50",
        "--num-microbatches",
        "1",
    )
    assert data["token_slices"] == [300, 200, 100, 50] and data["seq_length"] == 650
    assert data["num_token_slices"] == 4


def test_interleaved_defaults_to_two_chunks(capsys):
    data = run_json(capsys, "--schedule", "interleaved", "--pipeline-model-parallel-size", "4")
    assert data["num_chunks"] == 2 and data["num_token_slices"] == 1
    assert data["bubble_fraction"] == pytest.approx([3 / (2 * 4 + 3)] * 4)


def test_table_output(capsys):
    assert main(["--schedule", "1f1b", "--pipeline-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "step time 15 units" in out and "mean bubble 20.00%" in out
    assert "stage" in out and "peak acts" in out


def test_print_schedule(capsys):
    main(
        [
            "--schedule",
            "1f1b",
            "--pipeline-model-parallel-size",
            "2",
            "--num-microbatches",
            "1",
            "--print-schedule",
        ]
    )
    assert "stage 0: F0.0 [>nF0.0] [<nB0.0] {<nB0.0} {>nF0.0} B0.0" in capsys.readouterr().out


def test_trace_and_plot_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trace, plot = tmp_path / "step.json", tmp_path / "step.png"
    data = run_json(
        capsys,
        "--schedule",
        "token-interleaved",
        "--pipeline-model-parallel-size",
        "2",
        "--num-microbatches",
        "2",
        "--num-token-slices",
        "3",
        "--trace",
        str(trace),
        "--plot",
        str(plot),
    )
    assert data["trace"] == str(trace) and data["plot"] == str(plot)
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e["cat"] != "communication" for e in events) == 2 * 2 * 3 * 2 * 2
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_analytic_cost_model(capsys):
    common = [
        "--pipeline-model-parallel-size",
        "4",
        "--num-microbatches",
        "1",
        "--cost-model",
        "analytic",
        "--model",
        "gpt3-1b",
    ]
    stock = run_json(capsys, "--schedule", "gpipe", *common)
    token = run_json(capsys, "--schedule", "terapipe", "--num-token-slices", "8", *common)
    assert stock["time_unit"] == "s" and 0 < token["step_time"] < stock["step_time"]
    assert len(token["peak_activation_bytes"]) == 4 and token["peak_activation_bytes"][0] > 0
    tuned = run_json(capsys, "--schedule", "gpipe", *common, "--efficiency", "0.9")
    assert tuned["step_time"] < stock["step_time"]


def test_analytic_needs_model_dims(capsys):
    err = run_error(capsys, "--cost-model", "analytic", "--num-layers", "8")
    assert "--hidden-size" in err and "--num-attention-heads" in err


@pytest.mark.parametrize(
    "flag",
    [
        "--pipeline-model-parallel-size",
        "--num-microbatches",
        "--num-token-slices",
        "--virtual-pipeline-model-parallel-size",
    ],
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_values_below_one(capsys, flag, value):
    err = run_error(capsys, flag, value)
    assert f"{flag} must be >= 1, got {value}" in err


def test_more_slices_than_tokens(capsys):
    err = run_error(capsys, "--seq-length", "4", "--num-token-slices", "8")
    assert "--num-token-slices=8" in err and "at most 4 slices" in err


def test_token_slices_must_sum_to_seq_length(capsys):
    err = run_error(capsys, "--token-slices", "100,100", "--seq-length", "300")
    assert "--token-slices" in err and "seq_length=300" in err
    err = run_error(capsys, "--token-slices", "100,x")
    assert "--token-slices='100,x'" in err


def test_interleaving_needs_divisible_microbatches(capsys):
    err = run_error(
        capsys,
        "--schedule",
        "interleaved",
        "--pipeline-model-parallel-size",
        "4",
        "--num-microbatches",
        "6",
    )
    assert "--num-microbatches=6" in err and "divisible by --pipeline-model-parallel-size" in err


def test_stock_schedule_with_slices(capsys):
    err = run_error(capsys, "--schedule", "1f1b", "--num-token-slices", "4")
    assert "--num-token-slices=1, got 4" in err


def test_unknown_schedule(capsys):
    err = run_error(capsys, "--schedule", "zero-bubble")
    assert "'zero-bubble'" in err
    for name in ("terapipe", "token-1f1b", "token-interleaved", "1f1b", "interleaved", "gpipe"):
        assert name in err


def test_slice_flags_are_exclusive(capsys):
    err = run_error(capsys, "--num-token-slices", "2", "--token-slices", "1,1")
    assert "not allowed with argument" in err


def test_layers_must_fill_virtual_stages(capsys):
    err = run_error(
        capsys,
        "--schedule",
        "token-interleaved",
        "--cost-model",
        "analytic",
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
    )
    assert "--num-layers=4 cannot fill 8 virtual stages" in err


# -- ratios and outputs are checked before simulating (issue 14) --------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backward-ratio", "-1"], "--backward-ratio=-1.0 must be > 0"),
        (["--backward-ratio", "0"], "--backward-ratio=0.0 must be > 0"),
        (["--cost-model", "analytic", "--model", "gpt3-1b", "--efficiency", "0"],
         "--efficiency=0.0 must be > 0"),
        (["--cost-model", "analytic", "--model", "gpt3-1b", "--device-tflops", "-5"],
         "--device-tflops=-5.0 must be > 0"),
    ],
)
def test_impossible_ratios_are_refused(capsys, argv, message):
    err = run_error(capsys, *argv)
    assert err.strip().splitlines()[-1] == f"terapipe-simulate: error: {message}"


@pytest.mark.parametrize("flag", ["--plot", "--trace"])
def test_missing_output_directory_is_refused_before_simulating(capsys, tmp_path, flag, monkeypatch):
    import megatron_terapipe.simulate.cli as cli

    def never(*args, **kwargs):
        raise AssertionError("simulated although the output cannot be written")

    monkeypatch.setattr(cli, "simulate", never)
    target = tmp_path / "missing" / "step.out"
    err = run_error(capsys, flag, str(target))
    assert err.strip().splitlines()[-1] == (
        f"terapipe-simulate: error: {flag} {target}: directory {target.parent} does not exist"
    )


def test_split_backward_and_weight_grad_share(capsys):
    """1F1B, P = 4, M = 8 at F = 1, B = 2: unsplit 3 (M + P - 1) = 33; split with W half of the
    backward, P - 1 hops one W (1) shorter: 30; with a W share of 0.25 (0.5 units): 31.5."""
    base = ["--schedule", "1f1b", "--pipeline-model-parallel-size", "4",
            "--num-microbatches", "8"]
    assert run_json(capsys, *base)["step_time"] == 33
    assert run_json(capsys, *base, "--split-backward")["step_time"] == 30
    quarter = run_json(capsys, *base, "--split-backward", "--weight-grad-share", "0.25")
    assert quarter["step_time"] == pytest.approx(31.5)
    assert "--weight-grad-share=1.5" in run_error(
        capsys, *base, "--split-backward", "--weight-grad-share", "1.5")
    assert "add --split-backward" in run_error(capsys, *base, "--weight-grad-share", "0.3")
    assert run_json(capsys, *base, "--split-backward")["split_backward"] is True
