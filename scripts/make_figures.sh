#!/usr/bin/env bash
# Sets up the environment (if needed) and regenerates every README figure into images/
# from the embedded offline data and small configs (python -m images.make_all).
# Extra arguments go to it, e.g. `bash scripts/make_figures.sh --only dynamics`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup_env.sh"
cd "$REPO_ROOT"
exec "${KRAUSE_VENV:-$REPO_ROOT/.venv}/bin/python" -m images.make_all "$@"
