"""scripts/gpu_check.sh --dry-run: the GPU check's steps at toy sizes on the CPU, so the
prepared script cannot rot. Steps a and b compare the token pipeline with the unsliced model /
the stock schedule for real (a broken token path fails them); c, d, e must produce records of
the same shape as the GPU run.

The main dry run runs under a budget that kills step d half-way (d first, so that the budget,
not the speed of a-c on a shared machine, decides where d is cut): a-c must still run and
return their results, d's finished rows must come back and the summary must name the missing
ones. The tolerances come from gpu_check/criteria.py, not from the records checked."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest

from megatron_terapipe.gpu_check import __main__ as orchestrator
from megatron_terapipe.gpu_check import deps, summary
from megatron_terapipe.gpu_check.common import RowWriter, read_rows
from megatron_terapipe.gpu_check.criteria import BF16_ERROR_RATIO, BF16_LOSS_RTOL, FP32_RTOL
from megatron_terapipe.gpu_check.inflation import DRY_ROUNDS, SLICE_COUNTS
from megatron_terapipe.slicing.latency_table import LatencyTableCostModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
# Step d's window in the budgeted run. d is killed 6 s before its window ends
# (orchestrator.KILL_GRACE_S), i.e. 28 s after its start, and its timed rounds alone last 37.5 s
# after its start-up (imports, the toy stage: 3-20 s here, depending on the load), so the cut
# falls inside the timed rounds. PRE_STEPS_S is the time before the first step (finding
# that there is nothing to install), which comes out of d's window.
D_WINDOW_S = 34.0
PRE_STEPS_S = 2.0
ORDER = "dabc"


def _budget_for_d_window(window_s: float) -> float:
    """The --budget-s that leaves step d (run first) `window_s`, the others their minimum."""
    later = sum(orchestrator.STEPS[k].dry_min_s + orchestrator.STEP_OVERHEAD_S
                for k in ORDER[1:])
    return (orchestrator.RESERVE_S + later + orchestrator.STEP_OVERHEAD_S + window_s
            + PRE_STEPS_S)


def _env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable)
    for var in ("MEGATRON_LM_PATH", "OUT", "GPU_CHECK_STARTED_AT"):
        env.pop(var, None)
    return env


def _gpu_check(out, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", SCRIPT, "--dry-run", "--out", str(out), "--wheels", str(out / "no-wheels"),
         *flags],
        capture_output=True, text=True, env=_env(), timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    budget = _budget_for_d_window(D_WINDOW_S)
    done = _gpu_check(out, "--steps", ORDER, "--budget-s", f"{budget:.0f}")
    with open(out / "summary.json", encoding="utf-8") as handle:
        result = json.load(handle)
    return out, done, {r["step"]: r for r in result["steps"]}


@pytest.fixture(scope="module")
def summarized(dry_run, tmp_path_factory):
    out, _, _ = dry_run
    target = tmp_path_factory.mktemp("summarized")
    done = subprocess.run(
        [sys.executable, "-m", "megatron_terapipe.gpu_check", "summarize", str(out), "--out",
         str(target)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    with open(target / "summary.json", encoding="utf-8") as handle:
        result = json.load(handle)
    return target, done, {r["step"]: r for r in result["steps"]}


def test_dry_run_prints_the_summary_and_fails_on_the_cut_step(dry_run):
    out, done, steps = dry_run
    # d cut by the budget is a failed run (exit status 1), nothing else is.
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    with open(out / "summary.md", encoding="utf-8") as handle:
        text = handle.read()
    assert text.strip() in done.stdout
    assert text.startswith("# GPU check (dry run on CPU, toy sizes)")
    for step in ORDER:
        assert f"\n## {step}. " in text
    assert {k: r["status"] for k, r in steps.items() if r["status"] in summary.BAD_STATUSES} \
        == {"d": "partial"}


def test_budget_cuts_d_half_way_and_its_rows_come_back(dry_run):
    out, _, steps = dry_run
    d = steps["d"]
    assert d["status"] == "partial", d
    assert d["killed_by_budget"] and "killed by budget" in d["reason"]
    assert d["elapsed_s"] <= d["window_s"]  # killed inside its window, not after
    rows = read_rows(out / "d.jsonl")
    timed = [r for r in rows if r["kind"] == "time"]
    expected = len(SLICE_COUNTS) * DRY_ROUNDS
    assert 0 < len(timed) < expected, rows  # cut half-way: some rows, not all
    # The summary's table holds exactly the returned rounds, and names every missing one.
    assert sum(r["rounds"] for r in d["rows"]) == len(timed)
    missing_rounds = sum(
        int(m["got"].split("/")[1]) - int(m["got"].split("/")[0])
        for m in d["missing"] if m["row"].endswith("timing rounds")
    )  # fmt: skip
    assert missing_rounds == expected - len(timed)
    assert all("killed by budget" in m["reason"] for m in d["missing"])
    with open(out / "summary.md", encoding="utf-8") as handle:
        assert "- MISSING S=" in handle.read()


def test_steps_after_the_cut_one_still_run(dry_run):
    out, _, steps = dry_run
    a = steps["a"]
    assert a["status"] == "pass"
    assert {(r["dtype"], r["mask"]) for r in a["rows"]} == {
        ("fp32", "causal"), ("fp32", "document mask"), ("bf16", "causal"),
        ("bf16", "document mask"),
    }  # fmt: skip
    assert {r["backend"] for r in a["rows"] if r["status"] == "pass"} >= {"math"}
    for row in (r for r in a["rows"] if r["status"] != "n/a"):
        if row["dtype"] == "fp32":
            assert row["loss_rel_diff"] <= FP32_RTOL
            assert row["max_grad_rel_diff"] <= FP32_RTOL
            assert row["stock_loss_rel_diff"] <= FP32_RTOL
            assert row["stock_max_grad_rel_diff"] <= FP32_RTOL
        else:  # bf16: against the fp32 copy, at most BF16_ERROR_RATIO x the unsliced run's error
            assert 0 < row["sliced_vs_fp32_grad"] <= BF16_ERROR_RATIO * row["whole_vs_fp32_grad"]
    b = steps["b"]
    assert b["status"] == "pass", b
    assert len(b["stock"]["losses"]) == len(b["token"]["losses"]) == 5
    for stock, token in zip(b["stock"]["losses"], b["token"]["losses"]):
        assert abs(token - stock) <= BF16_LOSS_RTOL * abs(stock)
    c = steps["c"]
    assert c["status"] == "measured" and not c["missing"], c
    assert not c["planned"] and "predicted_speedup" not in c["settings"][0]  # not on the device
    cells = [r for r in read_rows(out / "c.jsonl") if r["kind"] == "cell"]
    assert len(cells) == 2 * 10  # the two gpt3-175b TP sizes, a 4 x 4 grid's l + c <= 4 cells


def test_step_e_alone_parses_upstream_or_says_why_not(tmp_path):
    _gpu_check(tmp_path, "--steps", "e", "--budget-s", "300")
    with open(tmp_path / "summary.json", encoding="utf-8") as handle:
        e = json.load(handle)["steps"][0]
    # Without an upstream archive (or without its imports) e is skipped with the reason; with
    # both (a prepared .gpu_carry/) the dry run parses upstream's arguments.
    if e["status"] == "skipped":
        assert "MEGATRON_LM_PATH" in e["reason"] or "needs" in e["reason"], e
    else:
        assert e["status"] == "pass" and e["parsed"], e


def test_summarize_plans_step_c_on_the_cpu(summarized):
    _, done, steps = summarized
    assert done.returncode == 1, done.stderr[-3000:]  # d is still partial
    c = steps["c"]
    assert c["status"] == "pass" and c["planned"], c
    assert len(c["settings"]) == 2
    for row in c["settings"]:
        assert row["predicted_speedup"] > 0 and sum(row["token_slices"]) == c["seq_length"]
    assert steps["d"]["status"] == "partial"


def test_summarized_latency_tables_load_in_the_planner(summarized):
    target, _, _ = summarized
    with tarfile.open(target / "latency_tables.tgz") as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".npz")]
        tar.extractall(target / "tables", filter="data")
    assert len(names) == 2  # the two gpt3-175b TP sizes of configs/terapipe
    for name in names:
        table = LatencyTableCostModel.load(target / "tables" / name)
        assert table.seq_length == 64 and table.granularity == 16
        assert np.isinf(table.latency[0]).all()  # b = 0 is not a batch
        assert table.forward_backward_time(1, 16, 48) > 0


def test_step_d_alone_returns_every_row(tmp_path):
    done = _gpu_check(tmp_path, "--steps", "d", "--budget-s", "300")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "summary.json", encoding="utf-8") as handle:
        d = json.load(handle)["steps"][0]
    assert d["status"] == "measured" and d["missing"] == []
    assert [r["num_token_slices"] for r in d["rows"]] == list(SLICE_COUNTS)
    assert all(r["rounds"] == DRY_ROUNDS and r["peak_memory_gib"] is not None
               for r in d["rows"])
    assert d["rows"][0]["t_S_over_t_1"] == 1.0


def test_window_leaves_later_steps_their_minimum():
    steps = orchestrator.STEPS
    later = "cd"
    kept = orchestrator.RESERVE_S + sum(steps[k].min_s + orchestrator.STEP_OVERHEAD_S
                                        for k in later)
    window, reason = orchestrator.plan_window("a", later, 300.0, dry_run=False)
    assert reason is None and steps["a"].min_s <= window <= steps["a"].cap_s
    assert 300.0 - window - orchestrator.STEP_OVERHEAD_S >= kept
    # Too little left for a's minimum once c and d keep theirs: a is skipped, saying so.
    tight = kept + orchestrator.STEP_OVERHEAD_S + steps["a"].min_s - 1
    window, reason = orchestrator.plan_window("a", later, tight, dry_run=False)
    assert window == 0 and reason.startswith("not started: needs at least")


def test_steps_that_cannot_fit_are_skipped_with_the_reason(tmp_path):
    # 100 s: a's minimum plus what b's minimum keeps does not fit, nor then b's own minimum.
    done = _gpu_check(tmp_path, "--steps", "ab", "--budget-s", "100", timeout=120)
    events = read_rows(tmp_path / "run.jsonl")
    steps = {e["step"]: e for e in events if e.get("event") == "step"}
    assert set(steps) == {"a", "b"}, events
    for record in steps.values():
        assert record["status"] == "skipped"
        assert record["reason"].startswith("not started: needs at least"), record
    assert "step a (exactness), window" not in done.stdout  # never started


def test_a_timed_out_subprocess_is_killed_with_its_children(tmp_path):
    from megatron_terapipe.gpu_check.common import run_group

    pid_file = tmp_path / "child.pid"
    done, _ = run_group(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout_s=2)
    assert done is None  # timed out
    child = int(pid_file.read_text())
    for _ in range(50):
        if not _running(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the timed-out command still runs")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits to be reaped by whatever PID 1 is)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1]
                           for line in status)
    except FileNotFoundError:
        return False


def test_device_budget_fits_the_device_call():
    """420 s on the device: the minimum of every step fits with a margin, so none is skipped
    unless earlier steps overrun (the device call's limit is 480 s)."""
    need = orchestrator.RESERVE_S + sum(s.min_s + orchestrator.STEP_OVERHEAD_S
                                        for s in orchestrator.STEPS.values())
    assert need <= 420 - 60
    assert orchestrator.plan_window("a", "becd", 420 - 30, dry_run=False)[1] is None


def test_cut_off_call_is_summarized_from_partial_files(tmp_path):
    """A device call cut off as a whole: no end event, no record of c; c's returned cells
    are kept, the incomplete table is named as missing with why."""
    journal = RowWriter(str(tmp_path / "run.jsonl"))
    journal.write({"event": "start", "dry_run": False, "budget_s": 420, "steps": "ac"})
    journal.write({"event": "step", "step": "a", "status": "pass", "rows": []})
    journal.close()
    rows = RowWriter(str(tmp_path / "c.jsonl"))
    rows.write({"kind": "plan", "device": "cuda:0", "dtype": "bfloat16", "seq_length": 256,
                "granularity": 128, "clock": "wall", "repeats": 2, "cells_per_table": 3,
                "tables": [{"model": "m", "tensor_model_parallel": 1}],
                "settings": [], "skipped_settings": []})
    rows.write({"kind": "cell", "model": "m", "tensor_model_parallel": 1, "l": 1, "c": 0,
                "seconds": 0.01})
    rows.close()
    with open(tmp_path / "c.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"kind": "cell", "model": "m", "tensor')  # killed mid-write
    result = summary.collect(str(tmp_path), plan=False)
    steps = {r["step"]: r for r in result["steps"]}
    assert not result["complete"]
    assert steps["a"]["status"] == "pass"
    assert steps["c"]["status"] == "cut off"  # no complete table came back
    assert steps["c"]["missing"] == [{
        "row": "table m tp1", "got": "1/3 cells",
        "reason": "the device call ended before the step did (cut off by the outer time limit)",
    }]  # fmt: skip
    assert summary.exit_status(result) == 1
    assert "cut off before its end" in summary.markdown(result)


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
    monkeypatch.setattr(deps, "UPSTREAM", {"no_such_module_xyz": ("no_such_module_xyz",)})
    report = deps.ensure(str(tmp_path), str(tmp_path / "site"))
    assert report["installed"] == []
    assert len(report["missing"]) == 1
    assert report["missing"][0].startswith("no_such_module_xyz (needed by step e only)")
    assert deps.unavailable_for(report, "e") == ["no_such_module_xyz"]
    assert deps.unavailable_for(report, "a") == []


def _wheel(directory, name: str) -> str:
    """A minimal valid pure-Python wheel of module `name`."""
    path = os.path.join(directory, f"{name}-1.0-py3-none-any.whl")
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 7\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_one_bad_wheel_fails_only_its_package(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_good_pkg")
    (wheels / "gpucheck_bad_pkg-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    monkeypatch.setattr(deps, "NEEDED", {"gpucheck_bad_pkg": ("gpucheck_bad_pkg",)})
    monkeypatch.setattr(deps, "STEPS_NEEDING", {"gpucheck_bad_pkg": "ab"})
    monkeypatch.setattr(deps, "UPSTREAM", {"gpucheck_good_pkg": ("gpucheck_good_pkg",)})
    site = tmp_path / "site"
    report = deps.ensure(str(wheels), str(site))
    rows = {r["module"]: r for r in report["packages"]}
    assert rows["gpucheck_bad_pkg"]["status"] == "failed"
    assert rows["gpucheck_good_pkg"]["status"] == "installed"
    assert report["installed"] == ["gpucheck_good_pkg"]
    assert (site / "gpucheck_good_pkg" / "__init__.py").exists()
    assert deps.unavailable_for(report, "a") == ["gpucheck_bad_pkg"]
    assert deps.unavailable_for(report, "e") == []  # e needs only the good one: it runs


def test_bad_flags_are_refused_by_name(tmp_path):
    for flags, name in ((["--budget-s", "-5"], "--budget-s"), (["--budget-s", "soon"],
                                                                 "--budget-s"),
                        (["--steps", "abx"], "--steps"), (["--steps", "aa"], "--steps")):
        done = subprocess.run([sys.executable, "-m", "megatron_terapipe.gpu_check", "--out",
                               str(tmp_path), *flags], capture_output=True, text=True,
                              env=_env(), timeout=120)
        assert done.returncode == 2 and name in done.stderr, (flags, done.stderr)
    done = subprocess.run([sys.executable, "-m", "megatron_terapipe.gpu_check", "summarize",
                           str(tmp_path / "nothing")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "dir:" in done.stderr and "run.jsonl" in done.stderr


def _write_patch(tmp_path, old: list[str], new: list[str]) -> str:
    diff = difflib.unified_diff([f"{x}\n" for x in old], [f"{x}\n" for x in new],
                                "a/pkg/f.py", "b/pkg/f.py")
    path = tmp_path / "change.patch"
    path.write_text("diff --git a/pkg/f.py b/pkg/f.py\n" + "".join(diff), encoding="utf-8")
    return str(path)


def test_patch_is_applied_and_undone_in_python(tmp_path):
    from megatron_terapipe.gpu_check.upstream import apply_patch

    old = [f"line {i}" for i in range(60)]
    new = list(old)
    new.insert(5, "added")
    del new[30]
    new[50] = "changed"
    patch = _write_patch(tmp_path, old, new)
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    target = tree / "pkg" / "f.py"
    target.write_text("\n".join(old) + "\n", encoding="utf-8")
    assert apply_patch(patch, str(tree), reverse=True, check=True)[0] is False  # not applied
    assert apply_patch(patch, str(tree)) == (True, "")
    assert target.read_text(encoding="utf-8") == "\n".join(new) + "\n"
    assert apply_patch(patch, str(tree), check=True)[0] is False  # applies once only
    assert apply_patch(patch, str(tree), reverse=True) == (True, "")
    assert target.read_text(encoding="utf-8") == "\n".join(old) + "\n"


def test_patch_that_does_not_match_writes_nothing(tmp_path):
    from megatron_terapipe.gpu_check.upstream import apply_patch

    old = [f"line {i}" for i in range(40)]
    new = list(old)
    new[3], new[35] = "first", "second"
    patch = _write_patch(tmp_path, old, new)
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    drifted = list(old)
    drifted[36] = "upstream changed this"  # the second hunk's context no longer matches
    (tree / "pkg" / "f.py").write_text("\n".join(drifted) + "\n", encoding="utf-8")
    ok, message = apply_patch(patch, str(tree))
    assert not ok and "pkg/f.py: hunk @@" in message
    assert (tree / "pkg" / "f.py").read_text(encoding="utf-8") == "\n".join(drifted) + "\n"


def test_make_shim_stands_in_for_make_only_over_prebuilt_helpers(tmp_path):
    from megatron_terapipe.gpu_check.upstream import make_shim

    shim = os.path.join(make_shim(str(tmp_path / "bin")), "make")
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    env = dict(os.environ, GPU_CHECK_REAL_PATH="")  # as on a machine without make
    done = subprocess.run([shim, "-C", str(datasets)], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "no prebuilt helpers_cpp" in done.stderr
    (datasets / "helpers_cpp.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    done = subprocess.run([shim, "-C", str(datasets)], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "prebuilt" in done.stdout


def test_upstream_loss_lines_are_read():
    from megatron_terapipe.gpu_check.upstream import LOSS_LINE

    # Megatron-LM core_v0.16.1 training_log's format.
    line = (
        " [2026-12-01 00:00:00.000000] iteration        3/      10 | consumed samples:"
        "           24 | elapsed time per iteration (ms): 85.2 | learning rate: 1.000000E-04 |"
        " global batch size:     8 | lm loss: 6.912345E+00 | loss scale: 1.0 |"
    )
    assert LOSS_LINE.findall(line) == [("3", "6.912345E+00")]
