"""`python -m megatron_terapipe.gpu_check [--dry-run] [--out DIR] [--budget-s S]`: run steps a-e
in windows cut from one budget; `python -m megatron_terapipe.gpu_check summarize DIR`: the
summary with step c's plan and simulation, on the CPU, from the files a device run returned.

The device machine gives 15 minutes of device time in all and 10 a command, so every step runs
in its own process group inside a window taken from what is left of the budget, and is killed
(with its children) at the window's end: one crash or hang costs only its own step. A step's
window leaves the steps after it their minimum time (`Step.min_s`), so an overrunning check
cannot starve the measurements; a step whose minimum no longer fits is skipped with the reason.
Everything is written to the output folder as it happens (run.jsonl: the dependency report
and each step's record the moment the step ends; c.jsonl, d.jsonl: one line per measurement,
written by the steps themselves), so a step killed by its window, or a device call cut off as a
whole, still returns what was measured; `summary` names the rows that are missing and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

from megatron_terapipe.gpu_check import deps, summary
from megatron_terapipe.gpu_check.common import RowWriter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Step:
    """One step's module and time: `min_s` is the least window in which it can return
    anything (below it the step is skipped, and that much is kept free for it while earlier
    steps run), `cap_s` the most it may take; the dry run's pair is for the shared CPU cores
    of a test machine (start-up there is slower than a GPU's toy work)."""

    module: str
    title: str
    min_s: float
    cap_s: float
    dry_min_s: float
    dry_cap_s: float
    rows_file: str | None = None  # the step appends its measurements here, under the out dir

    def window_bounds(self, dry_run: bool) -> tuple[float, float]:
        return (self.dry_min_s, self.dry_cap_s) if dry_run else (self.min_s, self.cap_s)


STEPS = {
    "a": Step("exactness", "exactness per SDPA backend", 40, 90, 60, 150),
    "b": Step("nccl", "world-size-1 NCCL trainer steps vs stock", 60, 120, 90, 180),
    "c": Step("latency", "per-slice cost at paper shapes", 45, 150, 60, 150, "c.jsonl"),
    "d": Step("inflation", "single-stage inflation t_S / t_1", 45, 120, 15, 120, "d.jsonl"),
    "e": Step("upstream", "upstream Megatron-LM + patches/ vs stock", 90, 200, 30, 120),
}
# Kept at the end of the budget for the summary.
RESERVE_S = 15.0
# Wall time a step costs beyond its window (start, journal line, logs archive), kept for each
# later step beside its minimum, so that a step using its whole window still leaves every later
# step at least its minimum.
STEP_OVERHEAD_S = 2.0
# Seconds a killed step's process group gets between SIGTERM and SIGKILL; the kill starts this
# long twice before the window's end, so that a killed step ends inside its window.
KILL_GRACE_S = 3.0
# Seconds before the kill that a step's inner timeouts end, so it can write its record.
INNER_MARGIN_S = 3.0
JOURNAL = "run.jsonl"


def plan_window(key: str, later: str, remaining_s: float,
                dry_run: bool) -> tuple[float, str | None]:
    """(window seconds, None) for step `key`, or (0, why it is skipped).

    The window is what is left of the budget less RESERVE_S, this step's STEP_OVERHEAD_S and,
    for every step still to run after it (`later`), its minimum and overhead; at most the
    step's cap."""
    low, cap = STEPS[key].window_bounds(dry_run)
    kept = RESERVE_S + sum(STEPS[k].window_bounds(dry_run)[0] + STEP_OVERHEAD_S for k in later)
    window = min(cap, remaining_s - kept - STEP_OVERHEAD_S)
    if window < low:
        return 0.0, (f"not started: needs at least {low:.0f} s, {remaining_s:.0f} s of the "
                     f"budget left of which {kept:.0f} s are kept for the summary and the "
                     f"minimum of later steps ({later or 'none'})")
    return window, None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the step's whole process group (its trainer or torchrun
    children too, which would otherwise keep the GPU)."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(key: str, dry_run: bool, work: str, out: str, window_s: float, env: dict) -> dict:
    """Run one step in its own process group, killed at the end of `window_s`."""
    step = STEPS[key]
    out_json = os.path.join(work, f"{key}.json")
    log_path = os.path.join(work, f"{key}.log")
    started = time.time()
    kill_at = max(1.0, window_s - 2 * KILL_GRACE_S)
    deadline = started + kill_at - INNER_MARGIN_S
    cmd = [sys.executable, "-m", f"megatron_terapipe.gpu_check.{step.module}", "--json",
           out_json, "--out-dir", work, "--deadline", f"{deadline:.3f}"]
    if step.rows_file:
        rows_path = os.path.join(out, step.rows_file)
        if os.path.exists(rows_path):
            os.remove(rows_path)  # a previous run's rows are not this run's
        cmd += ["--rows", rows_path]
    cmd += ["--dry-run"] if dry_run else []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
    elapsed = time.time() - started
    if code == 0 and os.path.exists(out_json):
        with open(out_json, encoding="utf-8") as handle:
            record = json.load(handle)
    else:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read().strip().splitlines()[-15:]
        if code is None:
            record = {"step": key, "title": step.title, "status": "timeout",
                      "killed_by_budget": True,
                      "reason": f"killed by budget at the end of its {window_s:.0f} s window"}
        else:
            record = {"step": key, "title": step.title, "status": "error",
                      "reason": f"exit status {code}"}
        record["log_tail"] = tail
    record.update(step=key, window_s=round(window_s, 1), elapsed_s=round(elapsed, 1))
    return record


def _archive_logs(work: str, out: str) -> None:
    """logs.tgz in `out`, rewritten after every step so that a cut-off call returns the logs
    of the steps that ended."""
    path = os.path.join(out, "logs.tgz")
    with tarfile.open(path + ".tmp", "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            if name.endswith((".log", ".json")):
                tar.add(os.path.join(work, name), arcname=f"logs/{name}")
    os.replace(path + ".tmp", path)


def _positive(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes seconds, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0 seconds, got {text!r}")
        return value

    return parse


def _step_keys(text: str) -> str:
    bad = sorted(set(text) - set(STEPS))
    if bad or not text or len(set(text)) != len(text):
        raise argparse.ArgumentTypeError(
            f"--steps takes each of the letters {''.join(STEPS)} at most once (e.g. abecd), "
            f"got {text!r}")
    return text


def check(argv: list[str]) -> int:
    """The device run: steps in windows, then the device-side summary (no planning)."""
    parser = argparse.ArgumentParser(prog="gpu_check")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on the CPU (gloo, math attention)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "out",
                                                                               "gpu_check"))
    parser.add_argument("--wheels", default=os.path.join(REPO, ".gpu_carry", "wheels"))
    parser.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "gpu_check_site"))
    parser.add_argument("--budget-s", type=_positive("--budget-s"), default=420.0,
                        help="overall seconds for everything, counted from --started-at")
    parser.add_argument("--started-at", type=_positive("--started-at"),
                        default=os.environ.get("GPU_CHECK_STARTED_AT") or time.time(),
                        help="epoch seconds the budget counts from (scripts/gpu_check.sh "
                        "passes its own start, so unpacking the archive counts too)")
    parser.add_argument("--steps", type=_step_keys, default="abecd",
                        help="steps to run, in this order (default: the checks a, b, e before "
                        "the measurements c, d)")
    ns = parser.parse_args(argv)
    if time.time() - ns.started_at > ns.budget_s:
        parser.error(f"--started-at {ns.started_at:.0f} is more than --budget-s "
                     f"{ns.budget_s:.0f} s ago: nothing can run")

    def remaining() -> float:
        return ns.budget_s - (time.time() - ns.started_at)

    os.makedirs(ns.out, exist_ok=True)
    journal_path = os.path.join(ns.out, JOURNAL)
    if os.path.exists(journal_path):
        os.remove(journal_path)
    journal = RowWriter(journal_path)
    journal.write({"event": "start", "dry_run": ns.dry_run, "budget_s": ns.budget_s,
                   "steps": ns.steps, "started_at": ns.started_at})
    work = tempfile.mkdtemp(prefix="gpu_check_")

    # Installing may take a quarter of what is left at most; the steps need the rest.
    dependency_report = deps.ensure(ns.wheels if os.path.isdir(ns.wheels) else None, ns.site,
                                    deadline=time.time() + remaining() / 4)
    journal.write({"event": "dependencies", **dependency_report})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [REPO] + ([ns.site] if dependency_report["installed"] else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    sys.path[:0] = paths
    # Versions and device, read beside the first step (importing torch and megatron-core takes
    # seconds that the steps' windows should not lose); journaled as soon as it is read.
    env_proc = subprocess.Popen(
        [sys.executable, "-c", "import json; from megatron_terapipe.gpu_check.common "
         "import environment; print(json.dumps(environment()))"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def journal_environment(wait_s: float) -> None:
        nonlocal env_proc
        if env_proc is None:
            return
        try:
            stdout, _ = env_proc.communicate(timeout=wait_s)
            environment = json.loads(stdout or "{}")
        except subprocess.TimeoutExpired:
            if wait_s == 0:
                return
            env_proc.kill()
            env_proc.communicate()
            environment = {"error": f"environment not read within {wait_s:.0f} s"}
        except json.JSONDecodeError as exc:
            environment = {"error": f"environment not read: {exc}"}
        journal.write({"event": "environment", **environment})
        env_proc = None

    # Steps that lack a package are not started, so no time is kept for them.
    runnable = "".join(k for k in ns.steps if not deps.unavailable_for(dependency_report, k))
    for index, key in enumerate(ns.steps):
        later = "".join(k for k in ns.steps[index + 1:] if k in runnable)
        window, skip = plan_window(key, later, remaining(), ns.dry_run)
        lacking = deps.unavailable_for(dependency_report, key)
        if lacking:
            skip = f"not started: needs {', '.join(lacking)}, which could not be installed " \
                "(see the dependencies above)"
        if skip:
            record = {"step": key, "title": STEPS[key].title, "status": "skipped",
                      "reason": skip}
            print(f"[gpu_check] step {key}: skipped ({skip})", flush=True)
        else:
            print(f"[gpu_check] step {key} ({STEPS[key].module}), window {window:.0f} s ...",
                  flush=True)
            record = run_step(key, ns.dry_run, work, ns.out, window, env)
            print(f"[gpu_check] step {key}: {record.get('status')} ({record['elapsed_s']} s)",
                  flush=True)
        journal.write({"event": "step", **record})
        _archive_logs(work, ns.out)
        journal_environment(0)
    journal_environment(max(1.0, min(30.0, remaining() - RESERVE_S / 2)))
    journal.write({"event": "end", "elapsed_s": round(time.time() - ns.started_at, 1)})
    journal.close()
    shutil.rmtree(work, ignore_errors=True)  # its logs are in logs.tgz

    result = summary.collect(ns.out, plan=False)
    text = summary.write(result, ns.out)
    print(text, flush=True)
    return summary.exit_status(result)


def summarize(argv: list[str]) -> int:
    """On the CPU, after the device call: the summary of DIR with step c's DP plan and
    simulated speedup from its returned latency rows, and the latency tables as .npz."""
    parser = argparse.ArgumentParser(prog="gpu_check summarize")
    parser.add_argument("dir", help="the files a device run returned ($OUT there)")
    parser.add_argument("--out", default=None,
                        help="where summary.json, summary.md and latency_tables.tgz go "
                        "(default: DIR; the returned folder may be read-only)")
    ns = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(ns.dir, JOURNAL)):
        parser.error(f"dir: {ns.dir} holds no {JOURNAL} (not the output of a GPU check)")
    out = ns.out or ns.dir
    os.makedirs(out, exist_ok=True)
    result = summary.collect(ns.dir, plan=True, tables_out=out)
    text = summary.write(result, out)
    print(text, flush=True)
    return summary.exit_status(result)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summarize"]:
        return summarize(argv[1:])
    return check(argv)


if __name__ == "__main__":
    sys.exit(main())
