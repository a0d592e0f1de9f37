#!/usr/bin/env bash
# One prepared check of the token pipeline on one GPU (docs/gpu.md):
#   a. exactness per SDPA backend   b. world-size-1 NCCL trainer steps vs stock
#   c. per-slice cost at paper shapes -> latency rows (planned on the CPU afterwards)
#   d. single-stage t_S / t_1         e. upstream Megatron-LM + patches/ vs stock
# Writes to $OUT, or to --out DIR, or to out/gpu_check, as it goes: run.jsonl (dependencies,
# each step's record as it ends), c.jsonl and d.jsonl (one line per measurement), logs.tgz;
# at the end summary.json and summary.md (printed). Every step runs in a window cut from
# --budget-s (counted from this script's start) and is killed at its end; what it measured
# until then comes back. Afterwards, on the CPU:
#   python -m megatron_terapipe.gpu_check summarize DIR --out OUT   (DP plan, simulation)
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--steps abecd] [--budget-s 420]
#
# --dry-run: the same steps at toy sizes on the CPU (gloo, math attention, tiny grid); step e
# then only parses upstream's arguments, and runs only with MEGATRON_LM_PATH set.
# Missing Python packages (megatron-core, upstream's six/regex/pyyaml/pydantic) are installed
# from .gpu_carry/wheels (scripts/gpu_prepare.sh) into a --target folder; the extracted
# .gpu_carry/megatron-lm-<tag>.tar becomes MEGATRON_LM_PATH.
set -uo pipefail
export GPU_CHECK_STARTED_AT="${GPU_CHECK_STARTED_AT:-$(date +%s)}"  # the budget counts from here
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="${PYTHON:-python3}"
# find_spec, not import: importing torch takes seconds of the budget.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" \
        2>/dev/null; then
    if [ -x "$REPO/.venv/bin/python" ]; then
        PY="$REPO/.venv/bin/python"
    else
        echo "gpu_check: no Python with torch found (set PYTHON=...)" >&2
        exit 2
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

ARCHIVES=("$REPO"/.gpu_carry/megatron-lm-*.tar)
ARCHIVE="${ARCHIVES[-1]}"  # gpu_prepare.sh leaves one; of several, the last by name
if [ "${#ARCHIVES[@]}" -gt 1 ]; then
    echo "gpu_check: several upstream archives in .gpu_carry, using $ARCHIVE" >&2
fi
if [ -z "${MEGATRON_LM_PATH:-}" ] && [ -f "$ARCHIVE" ]; then
    export MEGATRON_LM_PATH="${TMPDIR:-/tmp}/gpu_check_megatron_lm"
    rm -rf "$MEGATRON_LM_PATH" && mkdir -p "$MEGATRON_LM_PATH"
    # Python's tarfile: the GPU image need not have tar.
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$ARCHIVE" "$MEGATRON_LM_PATH"
fi

exec "$PY" -m megatron_terapipe.gpu_check "$@"
