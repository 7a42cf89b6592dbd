#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the main job on embedded default data.
# For now: a quick side-by-side benchmark of Krause attention against dense attention
# (prints a table, writes runs/demo/attention_scaling.json).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup_env.sh"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/demo}"
mkdir -p "$OUT_DIR"
exec "${KRAUSE_VENV:-$REPO_ROOT/.venv}/bin/python" "$REPO_ROOT/benchmarks/attention_scaling.py" --quick \
    --out "$OUT_DIR/attention_scaling.json" "$@"
