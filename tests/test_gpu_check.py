"""scripts/gpu_check.sh --dry-run: the GPU check's steps at toy sizes on the CPU, so the
prepared script cannot rot. Steps a and b compare the token pipeline with the unsliced model /
the stock schedule for real (a broken token path fails them); c, d, e must produce records of
the same shape as the GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from megatron_terapipe.gpu_check import summary
from megatron_terapipe.slicing.latency_table import LatencyTableCostModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("MEGATRON_LM_PATH", None)
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out),
         "--wheels", str(out / "no-wheels")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    return out, done


def test_dry_run_passes_and_prints_the_summary(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with open(out / "summary.md", encoding="utf-8") as handle:
        text = handle.read()
    assert text.strip() in done.stdout
    assert text.startswith("# GPU check (dry run on CPU, toy sizes)")
    for step in "abcde":
        assert f"\n## {step}. " in text


def test_dry_run_steps(dry_run):
    out, _ = dry_run
    with open(out / "summary.json", encoding="utf-8") as handle:
        result = json.load(handle)
    steps = {r["step"]: r for r in result["steps"]}
    assert set(steps) == set("abcde")
    a = steps["a"]
    assert a["status"] == "pass"
    assert {(r["dtype"], r["mask"]) for r in a["rows"]} == {
        ("fp32", "causal"), ("fp32", "document mask"), ("bf16", "causal"),
        ("bf16", "document mask"),
    }  # fmt: skip
    assert {r["backend"] for r in a["rows"] if r["status"] == "pass"} >= {"math"}
    for row in (r for r in a["rows"] if r["status"] != "n/a"):
        if row["dtype"] == "fp32":
            assert row["loss_rel_diff"] <= row["rtol"]
            assert row["max_grad_rel_diff"] <= row["rtol"]
            assert row["stock_loss_rel_diff"] <= row["rtol"]
            assert row["stock_max_grad_rel_diff"] <= row["rtol"]
        else:  # bf16: against the fp32 copy, at most BF16_ERROR_RATIO x the unsliced run's error
            ratio = row["error_ratio_bound"]
            assert 0 < row["sliced_vs_fp32_grad"] <= ratio * row["whole_vs_fp32_grad"]
    b = steps["b"]
    assert b["status"] == "pass", b
    assert len(b["stock"]["losses"]) == len(b["token"]["losses"]) == 5
    assert max(b["loss_rel_diffs"]) <= b["loss_rtol"]
    c = steps["c"]
    assert c["status"] == "pass" and c["settings"]
    for row in c["settings"]:
        assert row["predicted_speedup"] > 0 and sum(row["token_slices"]) == c["seq_length"]
    d = steps["d"]
    assert [r["num_token_slices"] for r in d["rows"]] == [1, 2, 4, 8, 16]
    e = steps["e"]
    # Without an upstream checkout (or without its imports) e is skipped with the reason;
    # with both (a prepared .gpu_carry/) the dry run parses upstream's arguments.
    if e["status"] == "skipped":
        assert "MEGATRON_LM_PATH" in e["reason"] or "needs" in e["reason"], e
    else:
        assert e["status"] == "pass" and e["parsed"], e


def test_dry_run_latency_tables_load_in_the_planner(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "latency_tables.tgz") as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".npz")]
        tar.extractall(out / "tables", filter="data")
    assert len(names) == 2  # the two gpt3-175b TP sizes of configs/terapipe
    for name in names:
        table = LatencyTableCostModel.load(out / "tables" / name)
        assert table.seq_length == 64 and table.granularity == 16
        assert np.isinf(table.latency[0]).all()  # b = 0 is not a batch
        assert table.forward_backward_time(1, 16, 48) > 0


def test_failed_rows_show_in_the_markdown():
    result = {
        "dry_run": False,
        "environment": {"device": "NVIDIA H200"},
        "elapsed_s": 1.0,
        "steps": [{
            "step": "a", "title": "exactness", "status": "fail",
            "rows": [{"dtype": "fp32", "mask": "causal", "backend": "flash", "status": "FAIL",
                      "loss_rel_diff": 3e-3, "max_grad_rel_diff": 1e-2, "rtol": 1e-5}],
        }],
    }  # fmt: skip
    text = summary.markdown(result)
    assert "| a. exactness | fail |" in text
    assert "| fp32 | causal | flash | FAIL | 0.003 | 0.01 | – | – |" in text


def test_missing_packages_are_named_not_fatal(tmp_path, monkeypatch):
    from megatron_terapipe.gpu_check import deps

    monkeypatch.setattr(deps, "UPSTREAM", {"no_such_module_xyz": ("no_such_module_xyz",)})
    report = deps.ensure(str(tmp_path), str(tmp_path / "site"))
    assert report["installed"] == []
    assert len(report["missing"]) == 1
    assert report["missing"][0].startswith("no_such_module_xyz (needed by step e only)")


def test_upstream_loss_lines_are_read():
    from megatron_terapipe.gpu_check.upstream import LOSS_LINE

    # Megatron-LM core_v0.16.1 training_log's format.
    line = (
        " [2026-12-01 00:00:00.000000] iteration        3/      10 | consumed samples:"
        "           24 | elapsed time per iteration (ms): 85.2 | learning rate: 1.000000E-04 |"
        " global batch size:     8 | lm loss: 6.912345E+00 | loss scale: 1.0 |"
    )
    assert LOSS_LINE.findall(line) == [("3", "6.912345E+00")]
