#!/usr/bin/env bash
# Single-node launcher: scripts/pretrain_gpt.py under torchrun, on all GPUs of this node or on
# the CPU (gloo) when there is none.
#
#   bash scripts/launch_torchrun.sh CONFIG [pretrain_gpt.py flags...]
#   bash scripts/launch_torchrun.sh configs/tiny-cpu.args --token-pipeline --train-iters 50
#
# Ranks per node: $NPROC_PER_NODE, else the config's "#@ nproc_per_node=N" hint, else the GPU
# count, else 2 (CPU). Flags after CONFIG override the config's. DRY_RUN=1 prints the command.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; exit 2; fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then echo "error: config $CONFIG: no such file" >&2; exit 2; fi
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"  # we cd to the repo below

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

hint() {  # value of a "#@ key=value" hint in the top-level config
    { grep -m1 "^#@.*\b$1=" "$CONFIG" || true; } | sed 's/^#@.*\b'"$1"'=\([^ ]*\).*/\1/'
}

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && [ "${CUDA_VISIBLE_DEVICES-unset}" != "" ]; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
NPROC="${NPROC_PER_NODE:-$(hint nproc_per_node)}"
if [ -z "$NPROC" ]; then
    if [ "$GPUS" -gt 0 ]; then NPROC="$GPUS"; else NPROC=2; fi
fi
NNODES_HINT="$(hint nnodes)"
if [ -n "$NNODES_HINT" ] && [ "$NNODES_HINT" != 1 ]; then
    echo "warning: $CONFIG is for $NNODES_HINT nodes; this launcher starts $NPROC ranks on one" \
         "node (use scripts/launch_slurm.sbatch)" >&2
fi
if [ "$GPUS" -eq 0 ]; then
    # CPU: gloo ranks, one thread each unless told otherwise.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

CMD=("$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC"
     "$ROOT/scripts/pretrain_gpt.py" --config "$CONFIG" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
cd "$ROOT"
exec "${CMD[@]}"
