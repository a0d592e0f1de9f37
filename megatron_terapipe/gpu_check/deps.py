"""Python packages the check needs, installed from carried wheels where the machine lacks them.

The GPU machine has torch, numpy, pytest, matplotlib and numba, and no network: megatron-core
(the release pip takes on its Python; and, for upstream Megatron-LM's pretrain_gpt.py, six,
regex, pyyaml, pydantic) travel as wheels made by scripts/gpu_prepare.sh and are installed
with `pip install --no-index --no-deps --target`. What is missing and has no wheel is reported
by name, not as a crash.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

# import name -> wheel distribution names (as in wheel file names, lower case, '_' for '-').
NEEDED = {
    "megatron.core": ("megatron_core",),
    "packaging": ("packaging",),
    "psutil": ("psutil",),
}
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


def ensure(wheel_dir: str | None, site: str) -> dict:
    """Install the carried wheels of missing packages into `site`; report what is missing."""
    report: dict = {"installed": [], "missing": [], "site": site}
    wanted = []
    for module, dists in {**NEEDED, **UPSTREAM}.items():
        if _importable(module):
            continue
        paths = [_wheel(wheel_dir, d) for d in dists] if wheel_dir else [None]
        if all(paths):
            wanted.extend(paths)
            report["installed"].append(module)
        else:
            use = " (needed by step e only)" if module in UPSTREAM else ""
            report["missing"].append(
                f"{module}{use}: not installed and no wheel in "
                f"{wheel_dir or '<no wheel folder>'} (scripts/gpu_prepare.sh makes them)"
            )
    if wanted:
        os.makedirs(site, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wanted]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            report["missing"].append(f"pip install failed: {done.stderr.strip()[-400:]}")
            report["installed"] = []
        else:
            _noop_helpers_makefile(site)
    return report


def _noop_helpers_makefile(site: str) -> None:
    """Upstream's initialize runs `make` in megatron/core/datasets to build helpers_cpp; the
    wheel ships that library prebuilt but no Makefile, so `make` would fail."""
    datasets = os.path.join(site, "megatron", "core", "datasets")
    makefile = os.path.join(datasets, "Makefile")
    if glob.glob(os.path.join(datasets, "helpers_cpp*.so")) and not os.path.exists(makefile):
        with open(makefile, "w", encoding="utf-8") as handle:
            handle.write("default:\n\t@echo helpers_cpp is prebuilt in the megatron-core wheel\n")
