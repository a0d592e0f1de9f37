# Sourced by scripts/test.sh and scripts/demo.sh: cd to the repo root and make sure .venv exists
# with this checkout installed (editable, with the test extras). Sets PY to the venv's python.
#
# torch is installed first and pinned: left to resolve megatron-core's range, pip would pull
# a multi-GB CUDA build; torch==2.13.0 resolves to the local CPU wheel where one is provided
# (PIP_FIND_LINKS) and to PyPI's otherwise. Re-installs only when setup.py/pyproject.toml
# change or the venv can't import the package from this checkout.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_SPEC="${TERAPIPE_TORCH_SPEC:-torch==2.13.0}"

_find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.10 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] < (3, 14))' \
            2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: need Python 3.10-3.13 (set PYTHON=/path/to/python3.11)" >&2
    return 1
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

ensure_venv() {
    local stamp="$VENV/.terapipe-install-key" key
    key="$(_install_key)"
    if [ ! -x "$PY" ]; then
        local python
        python="$(_find_python)"
        echo "[venv] creating $VENV with $python"
        "$python" -m venv "$VENV"
    fi
    if _venv_is_ready && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" = "$key" ]; }; then
        echo "$key" >"$stamp"
        return 0
    fi
    echo "[venv] installing into $VENV"
    if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
        "$PY" -m pip install "$TORCH_SPEC"
    fi
    "$PY" -m pip install -e ".[test]"
    _venv_is_ready || { echo "error: install finished but the package does not import" >&2; return 1; }
    echo "$key" >"$stamp"
}
