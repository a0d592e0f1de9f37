#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on the GPU machine (which has no network), on a
# machine WITH network, before the device call. Fills .gpu_carry/ (git-ignored; carried with
# the device call's `carry`, see docs/gpu.md):
#   .gpu_carry/wheels/                       megatron-core (cp312) and upstream's small
#                                            dependencies (six, regex, pyyaml, pydantic
#                                            and its deps, psutil, packaging)
#   .gpu_carry/megatron-lm-<tag>.tar         git archive of Megatron-LM's training files
# and checks here that patches/ applies to that archive with the same Python code the GPU
# check's step e runs there (the GPU machine may have no git, patch or make), so a patch that
# no longer applies is found before device time is spent.
#
#   bash scripts/gpu_prepare.sh [MEGATRON_LM_GIT]
#
# MEGATRON_LM_GIT: a clone (or bare mirror) of NVIDIA/Megatron-LM holding the tag; without it
# the tag is cloned shallowly from GitHub. The GPU machine runs Python 3.12, where pip takes
# megatron-core 0.19.x, so that and the matching upstream tag are the default; the pair is
# set with MEGATRON_CORE_VERSION and MEGATRON_LM_TAG (e.g. 0.16.1 and core_v0.16.1), and
# patches/megatron-lm-<tag>.patch must exist for the tag. A previous run's megatron-core
# wheel and archive are removed: the check installs and extracts the one it finds.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$REPO/.gpu_carry"
MCORE="${MEGATRON_CORE_VERSION:-0.19.2}"
TAG="${MEGATRON_LM_TAG:-core_v0.19.0}"
PY="${PYTHON:-python3}"
if [ ! -f "$REPO/patches/megatron-lm-$TAG.patch" ]; then
    echo "gpu_prepare: no patches/megatron-lm-$TAG.patch for MEGATRON_LM_TAG=$TAG" >&2
    exit 2
fi
mkdir -p "$CARRY/wheels"
rm -f "$CARRY"/wheels/megatron_core-*.whl "$CARRY"/megatron-lm-*.tar

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)
# megatron-core alone (its own requirements, torch and numpy, are on the GPU machine).
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CARRY/wheels" "megatron-core==$MCORE"
# Upstream pretrain_gpt.py's imports, with their dependencies (all small).
"$PY" -m pip download -q "${PLATFORM[@]}" -d "$CARRY/wheels" six regex pyyaml pydantic psutil \
    packaging

SRC="${1:-${MEGATRON_LM_GIT:-}}"
if [ -z "$SRC" ]; then
    SRC="$(mktemp -d)/Megatron-LM"
    git clone -q --depth 1 --branch "$TAG" https://github.com/NVIDIA/Megatron-LM "$SRC"
fi
GIT_DIR_="$( (cd "$SRC" && git rev-parse --absolute-git-dir) )"
# megatron/rl: training.py imports it at module level; megatron/legacy: gpt_builders.py of
# core_v0.16.1 does (core_v0.19.0 has none). Only the paths the tag holds are archived.
PATHS=()
for path in pretrain_gpt.py gpt_builders.py model_provider.py megatron/training \
        megatron/legacy megatron/post_training megatron/rl; do
    if [ -n "$(git --git-dir="$GIT_DIR_" ls-tree --name-only "$TAG" "$path")" ]; then
        PATHS+=("$path")
    fi
done
git --git-dir="$GIT_DIR_" archive "$TAG" "${PATHS[@]}" > "$CARRY/megatron-lm-$TAG.tar"

# The device machine applies the patch in Python (gpu_check/upstream.py); do the same here.
CHECK_DIR="$(mktemp -d)"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$CARRY/megatron-lm-$TAG.tar" \
        "$CHECK_DIR" "$TAG" <<'PYEOF'
import os, sys, tarfile
from megatron_terapipe.gpu_check.upstream import patched_tree
archive, work, tag = sys.argv[1:]
tarfile.open(archive).extractall(os.path.join(work, "src"), filter="data")
tree, found = patched_tree(os.path.join(work, "src"), work)
if found != tag:
    sys.exit(f"gpu_prepare: the archive of {tag} takes patches/megatron-lm-{found}.patch")
print(f"gpu_prepare: patches/megatron-lm-{tag}.patch applies to the archive (in Python)")
PYEOF
rm -rf "$CHECK_DIR"

ls -l "$CARRY/wheels" "$CARRY/megatron-lm-$TAG.tar"
du -sh "$CARRY"
