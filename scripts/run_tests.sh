#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"` for a quick run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup_env.sh"
cd "$REPO_ROOT"
exec "${KRAUSE_VENV:-$REPO_ROOT/.venv}/bin/python" -m pytest -q "$@"
