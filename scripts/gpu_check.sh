#!/usr/bin/env bash
# One prepared check of the token pipeline on one GPU (issue 13; docs/gpu.md):
#   a. exactness per SDPA backend   b. world-size-1 NCCL trainer steps vs stock
#   c. per-slice cost at paper shapes -> latency tables, DP plan, simulated speedup
#   d. single-stage t_S / t_1         e. upstream Megatron-LM + patches/ vs stock
# Writes summary.json, summary.md (printed), latency_tables.tgz and logs.tgz to $OUT, or to
# --out DIR, or to out/gpu_check. At most ~8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--steps abecd] [--budget-s 450]
#
# --dry-run: the same steps at toy sizes on the CPU (gloo, math attention, tiny grid); step e
# then only parses upstream's arguments, and runs only with MEGATRON_LM_PATH set.
# Missing Python packages (megatron-core, upstream's six/regex/pyyaml/pydantic) are installed
# from .gpu_carry/wheels (scripts/gpu_prepare.sh) into a --target folder; the extracted
# .gpu_carry/megatron-lm-<tag>.tar becomes MEGATRON_LM_PATH.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
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
    tar -xf "$ARCHIVE" -C "$MEGATRON_LM_PATH"
fi

exec "$PY" -m megatron_terapipe.gpu_check "$@"
