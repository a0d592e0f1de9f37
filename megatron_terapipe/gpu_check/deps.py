"""Python packages the check needs, installed from carried wheels where the machine lacks them.

The GPU machine has torch, numpy, pytest, matplotlib and numba, and no network: megatron-core
(the release pip takes on its Python; and, for upstream Megatron-LM's pretrain_gpt.py, six,
regex, pyyaml, pydantic) travel as wheels made by scripts/gpu_prepare.sh and are installed
with `pip install --no-index --no-deps --target`, one wheel per pip call: one bad wheel then
costs only the packages that need it, and only the steps that need those (`STEPS_NEEDING`)
are skipped. Every package's result is reported by name, not as a crash.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import time

# import name -> wheel distribution names (as in wheel file names, lower case, '_' for '-').
NEEDED = {
    "megatron.core": ("megatron_core",),
    "packaging": ("packaging",),
    "psutil": ("psutil",),
}
# At most this long for one pip call (a wheel of a few MB installs in seconds).
PIP_TIMEOUT_S = 60.0
# Which steps cannot run without a module (the others still run when it is unavailable).
STEPS_NEEDING = {"megatron.core": "abcde", "packaging": "abcde", "psutil": "abcde"}
UPSTREAM = {
    "six": ("six",),
    "regex": ("regex",),
    "yaml": ("pyyaml",),
    "pydantic": ("pydantic", "pydantic_core", "annotated_types", "typing_inspection",
                 "typing_extensions"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _wheel(directory: str, dist: str) -> str | None:
    """The newest wheel of `dist` in `directory` (by release numbers: 0.19.2 after 0.16.1),
    so that a folder still holding an older release installs the one it was prepared for."""
    found = [
        path
        for path in glob.glob(os.path.join(directory, "*.whl"))
        if os.path.basename(path).lower().split("-")[0] == dist
    ]
    return max(found, key=_release, default=None)


def _release(path: str) -> tuple[int, ...]:
    version = os.path.basename(path).split("-")[1]
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0]))


def ensure(wheel_dir: str | None, site: str, deadline: float | None = None) -> dict:
    """Install the carried wheels of missing packages into `site`, one pip call per wheel,
    each pip call's timeout what is left until `deadline` (epoch seconds) at most.

    Returns {"installed": modules now importable from `site`, "missing": one line per module
    that is unavailable and why, "unavailable": {module: steps that need it}, "packages":
    one row per module with its wheels' results, "site": site}."""
    report: dict = {"installed": [], "missing": [], "unavailable": {}, "packages": [],
                    "site": site}
    done: dict[str, str | None] = {}  # wheel path -> None (installed) or pip's error
    for module, dists in {**NEEDED, **UPSTREAM}.items():
        steps = STEPS_NEEDING.get(module, "e")
        row: dict = {"module": module, "needed_by": steps}
        if _importable(module):
            report["packages"].append(dict(row, status="present"))
            continue
        paths = [_wheel(wheel_dir, d) for d in dists] if wheel_dir else [None]
        use = " (needed by step e only)" if steps == "e" else ""
        if not all(paths):
            absent = [d for d, p in zip(dists, paths) if not p] if wheel_dir else list(dists)
            why = (f"not installed and no wheel of {', '.join(absent)} in "
                   f"{wheel_dir or '<no wheel folder>'} (scripts/gpu_prepare.sh makes them)")
            report["missing"].append(f"{module}{use}: {why}")
            report["unavailable"][module] = steps
            report["packages"].append(dict(row, status="no wheel", reason=why))
            continue
        errors = []
        for path in paths:
            if path not in done:
                done[path] = _pip_install(path, site, deadline)
            if done[path]:
                errors.append(f"{os.path.basename(path)}: {done[path]}")
        row["wheels"] = [os.path.basename(p) for p in paths]
        if errors:
            why = "pip install failed: " + " | ".join(errors)
            report["missing"].append(f"{module}{use}: {why}")
            report["unavailable"][module] = steps
            report["packages"].append(dict(row, status="failed", reason=why))
        else:
            report["installed"].append(module)
            report["packages"].append(dict(row, status="installed"))
    return report


def _pip_install(wheel: str, site: str, deadline: float | None) -> str | None:
    """Install one wheel into `site` (no index, no dependencies); None, or pip's error."""
    timeout_s = PIP_TIMEOUT_S if deadline is None else min(PIP_TIMEOUT_S,
                                                           deadline - time.time())
    if timeout_s < 1:
        return "not installed: no time left in the budget"
    os.makedirs(site, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, wheel]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"pip timed out after {timeout_s:.0f} s"
    if result.returncode != 0:
        return (result.stderr.strip() or result.stdout.strip())[-400:] or \
            f"exit status {result.returncode}"
    return None


def unavailable_for(report: dict, step: str) -> list[str]:
    """The unavailable modules step `step` needs (it is skipped when there are any)."""
    return sorted(m for m, steps in report.get("unavailable", {}).items() if step in steps)
