"""`python -m megatron_terapipe.gpu_check [--dry-run] [--out DIR]`: run steps a-e, summarise.

Each step runs in its own process with a time limit taken from one overall budget (the GPU
machine gives 10 minutes a command), so one crash or hang costs only its own step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from megatron_terapipe.gpu_check import deps, summary

STEPS = {
    "a": ("exactness", 90),
    "b": ("nccl", 150),
    "c": ("latency", 180),
    "d": ("inflation", 150),
    "e": ("upstream", 300),
}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_step(key: str, dry_run: bool, work: str, timeout_s: float, env: dict) -> dict:
    module, _ = STEPS[key]
    out_json = os.path.join(work, f"{key}.json")
    log_path = os.path.join(work, f"{key}.log")
    cmd = [sys.executable, "-m", f"megatron_terapipe.gpu_check.{module}", "--json", out_json,
           "--out-dir", work] + (["--dry-run"] if dry_run else [])
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout_s)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    elapsed = time.monotonic() - started
    if code == 0 and os.path.exists(out_json):
        with open(out_json, encoding="utf-8") as handle:
            record = json.load(handle)
    else:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read().strip().splitlines()[-15:]
        status = "timeout" if code is None else "error"
        reason = f"timed out after {timeout_s:.0f} s" if code is None else f"exit status {code}"
        record = {"step": key, "status": status, "reason": reason, "log_tail": tail}
    record["elapsed_s"] = round(elapsed, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on the CPU (gloo, math attention)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "out",
                                                                               "gpu_check"))
    parser.add_argument("--wheels", default=os.path.join(REPO, ".gpu_carry", "wheels"))
    parser.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "gpu_check_site"))
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="overall time for all steps (seconds)")
    parser.add_argument("--steps", default="abecd",
                        help="steps to run, in this order (default: the checks a, b, e before "
                        "the measurements c, d, so a tight budget starves measurements first)")
    ns = parser.parse_args(argv)
    started = time.monotonic()
    os.makedirs(ns.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")

    dependency_report = deps.ensure(ns.wheels if os.path.isdir(ns.wheels) else None, ns.site)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [REPO] + ([ns.site] if dependency_report["installed"] else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    sys.path[:0] = paths

    records = []
    for key in ns.steps:
        remaining = ns.budget_s - (time.monotonic() - started)
        if remaining < 10:
            records.append({"step": key, "status": "skipped",
                            "reason": f"out of time (budget {ns.budget_s:.0f} s)"})
            continue
        print(f"[gpu_check] step {key} ({STEPS[key][0]}) ...", flush=True)
        record = _run_step(key, ns.dry_run, work, min(STEPS[key][1], remaining), env)
        print(f"[gpu_check] step {key}: {record.get('status')} ({record['elapsed_s']} s)",
              flush=True)
        records.append(record)

    records.sort(key=lambda r: r["step"])
    environment = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from megatron_terapipe.gpu_check.common import "
         "environment; print(json.dumps(environment()))"],
        env=env, capture_output=True, text=True).stdout or "{}")
    result = {
        "dry_run": ns.dry_run,
        "environment": environment,
        "dependencies": dependency_report,
        "elapsed_s": time.monotonic() - started,
        "steps": records,
    }
    with open(os.path.join(ns.out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    text = summary.markdown(result)
    with open(os.path.join(ns.out, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    tables = os.path.join(work, "latency_tables.tgz")
    if os.path.exists(tables):
        shutil.copy2(tables, os.path.join(ns.out, "latency_tables.tgz"))
    with tarfile.open(os.path.join(ns.out, "logs.tgz"), "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            if name.endswith((".log", ".json")):
                tar.add(os.path.join(work, name), arcname=f"logs/{name}")
    shutil.rmtree(work, ignore_errors=True)
    print(text, flush=True)
    bad = [r["step"] for r in records if r.get("status") in ("fail", "error", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
