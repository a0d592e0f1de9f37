#!/usr/bin/env bash
# The CPU demo: creates and fills .venv on a fresh machine, then trains a tiny GPT on 2 gloo
# ranks with pipeline parallelism. Extra arguments go to the demo (e.g. --train-iters 20).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
exec "$PY" scripts/_demo_stock.py "$@"
