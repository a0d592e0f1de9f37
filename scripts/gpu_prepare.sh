#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on the GPU machine (which has no network), on a
# machine WITH network, before the device call. Fills .gpu_carry/ (git-ignored; carried with
# the device call's `carry`, see docs/gpu.md):
#   .gpu_carry/wheels/                       megatron-core 0.16.1 (cp312) and upstream's
#                                            small dependencies (six, regex, pyyaml,
#                                            pydantic and its deps, psutil, packaging)
#   .gpu_carry/megatron-lm-core_v0.16.1.tar  git archive of Megatron-LM's training files
#
#   bash scripts/gpu_prepare.sh [MEGATRON_LM_GIT]
#
# MEGATRON_LM_GIT: a clone (or bare mirror) of NVIDIA/Megatron-LM holding tag core_v0.16.1;
# without it the tag is cloned shallowly from GitHub.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/.gpu_carry"
TAG=core_v0.16.1
PY="${PYTHON:-python3}"
mkdir -p "$CARRY/wheels"

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
# megatron-core alone (its own requirements, torch and numpy, are on the GPU machine).
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CARRY/wheels" megatron-core==0.16.1
# Upstream pretrain_gpt.py's imports, with their dependencies (all small).
"$PY" -m pip download -q "${PLATFORM[@]}" -d "$CARRY/wheels" six regex pyyaml pydantic psutil \
    packaging

SRC="${1:-${MEGATRON_LM_GIT:-}}"
if [ -z "$SRC" ]; then
    SRC="$(mktemp -d)/Megatron-LM"
    git clone -q --depth 1 --branch "$TAG" https://github.com/NVIDIA/Megatron-LM "$SRC"
fi
git --git-dir="$( (cd "$SRC" && git rev-parse --absolute-git-dir) )" archive "$TAG" \
    pretrain_gpt.py gpt_builders.py model_provider.py megatron/training megatron/legacy \
    megatron/post_training megatron/rl > "$CARRY/megatron-lm-$TAG.tar"

ls -l "$CARRY/wheels" "$CARRY/megatron-lm-$TAG.tar"
du -sh "$CARRY"
