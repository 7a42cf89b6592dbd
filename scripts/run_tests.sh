#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the whole test suite, slow tests included, on
# one pytest-xdist worker per core (tests/conftest.py); tests/test_slurm.py is one xdist group.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"` for a quick run,
# `-n 0` for one process (a later -n wins).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup_env.sh"
cd "$REPO_ROOT"
exec "${KRAUSE_VENV:-$REPO_ROOT/.venv}/bin/python" -m pytest -q -n auto --dist loadgroup "$@"
