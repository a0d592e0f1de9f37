#!/usr/bin/env bash
# Lint and run the test suite; creates and fills .venv on a fresh machine.
#   bash scripts/test.sh                 # ruff + all tests (the CI entry point, via .ci/run)
#   bash scripts/test.sh -k stock -x     # extra arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv

start=$SECONDS
ruff_rc=0
echo "[test] ruff check ."
"$VENV/bin/ruff" check . || ruff_rc=$?

echo "[test] pytest -q $*"
pytest_rc=0
"$PY" -m pytest -q "$@" || pytest_rc=$?
if [ "$pytest_rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: counted as a failure" >&2
fi

echo "[test] ruff: $([ "$ruff_rc" -eq 0 ] && echo ok || echo "FAILED ($ruff_rc)")," \
    "pytest: $([ "$pytest_rc" -eq 0 ] && echo ok || echo "FAILED ($pytest_rc)")," \
    "$((SECONDS - start))s"
if [ "$pytest_rc" -ne 0 ]; then exit "$pytest_rc"; fi
exit "$ruff_rc"
