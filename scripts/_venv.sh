# Sourced by scripts/test.sh and scripts/demo.sh: cd to the repo root and make sure a venv exists
# with this checkout installed (editable, with the test extras). Sets PY to the venv's python.
#
# Which Python: the newest supported pair the machine offers. Python 3.12 (python3.12 on PATH,
# or a pyenv 3.12.x) takes megatron-core 0.19.x, the release Megatron users are on; without it
# Python 3.11 (then 3.10) takes megatron-core 0.16.1, the newest release for those Pythons.
# Override with TERAPIPE_PYTHON (a version such as 3.11, or a path to an interpreter) and
# TERAPIPE_VENV (the venv folder, default .venv); CI builds both pairs that way.
#
# torch is installed first and pinned: left to resolve megatron-core's range, pip would pull
# whatever build it likes. On 3.11, torch==2.13.0 resolves to the local CPU wheel where one is
# provided (PIP_FIND_LINKS); on 3.12 PyPI has only CUDA builds (they run on the CPU).
# TERAPIPE_TORCH_SPEC overrides. Re-installs only when setup.py/pyproject.toml change or the
# venv can't import the package from this checkout.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${TERAPIPE_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"

_runs() {
    # pyenv shims exist for every installed version but fail for the inactive ones.
    "$1" -c 'import sys' >/dev/null 2>&1
}

_python_for() {
    # An interpreter of version $1 (e.g. 3.12): on PATH, else the newest pyenv build of it.
    local version="$1" candidate root
    if command -v "python$version" >/dev/null 2>&1 && _runs "python$version"; then
        echo "python$version"
        return 0
    fi
    root="${PYENV_ROOT:-$HOME/.pyenv}"
    for candidate in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -V -r); do
        if [ -x "$candidate/bin/python$version" ] && _runs "$candidate/bin/python$version"; then
            echo "$candidate/bin/python$version"
            return 0
        fi
    done
    return 1
}

_find_python() {
    local wanted="${TERAPIPE_PYTHON:-}" version
    if [ -n "$wanted" ]; then
        case "$wanted" in
            */*) _runs "$wanted" && { echo "$wanted"; return 0; } ;;
            *) _python_for "$wanted" && return 0 ;;
        esac
        echo "error: TERAPIPE_PYTHON=$wanted is not a working interpreter or an installed" \
            "Python version (e.g. 3.12, 3.11, or /path/to/python3.12)" >&2
        return 1
    fi
    for version in 3.12 3.11 3.10; do
        _python_for "$version" && return 0
    done
    echo "error: need Python 3.12 (megatron-core 0.19) or 3.10/3.11 (megatron-core 0.16.1);" \
        "none found on PATH or under pyenv (set TERAPIPE_PYTHON=/path/to/python3.12)" >&2
    return 1
}

_torch_spec() {
    if [ -n "${TERAPIPE_TORCH_SPEC:-}" ]; then
        echo "$TERAPIPE_TORCH_SPEC"
    elif "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))'; then
        echo "torch==2.14.1"
    else
        echo "torch==2.13.0"
    fi
}

_install_key() {
    cat setup.py pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1
}

_venv_is_ready() {
    # The package must come from this checkout (a copied .venv would point elsewhere).
    "$PY" - "$ROOT" <<'PY' >/dev/null 2>&1
import importlib.util, os, sys
# find_spec, not import: importing torch and megatron-core would cost seconds on every call.
for name in ("torch", "megatron.core", "pytest", "ruff"):
    if importlib.util.find_spec(name) is None:
        sys.exit(1)
spec = importlib.util.find_spec("megatron_terapipe")
root = os.path.realpath(sys.argv[1])
sys.exit(spec is None or not os.path.realpath(spec.origin).startswith(root + os.sep))
PY
}

_print_pair() {
    "$PY" - "$VENV" <<'PY'
import platform, sys
from importlib.metadata import version
print(f"[venv] {sys.argv[1]}: Python {platform.python_version()}, "
      f"megatron-core {version('megatron-core')}, torch {version('torch')}")
PY
}

ensure_venv() {
    local stamp="$VENV/.terapipe-install-key" key
    key="$(_install_key)"
    if [ ! -x "$PY" ]; then
        local python
        python="$(_find_python)"
        echo "[venv] creating $VENV with $python"
        "$python" -m venv "$VENV"
    fi
    if ! { _venv_is_ready && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" = "$key" ]; }; }; then
        echo "[venv] installing into $VENV"
        if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
            "$PY" -m pip install "$(_torch_spec)"
        fi
        "$PY" -m pip install -e ".[test]"
        _venv_is_ready || {
            echo "error: install finished but the package does not import" >&2
            return 1
        }
    fi
    echo "$key" >"$stamp"
    _print_pair
}
