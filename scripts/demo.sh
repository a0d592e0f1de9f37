#!/usr/bin/env bash
# The CPU demo: creates and fills .venv on a fresh machine, then trains the same tiny GPT three
# times with scripts/pretrain_gpt.py on 2 gloo ranks (PP=2, same seed): megatron-core's 1F1B on
# the token pipeline's attention kernel (--attention-backend flash), the token pipeline with
# TeraPipe's DP slicer, and megatron-core's 1F1B on its local-spec attention. Prints the losses
# side by side and two labelled ratios: "schedule gain, same kernel" and "vs stock local-spec
# attention". Extra arguments go to the demo (e.g. --train-iters 10, or -- --seq-length 256).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
exec "$PY" -m megatron_terapipe.training.demo "$@"
