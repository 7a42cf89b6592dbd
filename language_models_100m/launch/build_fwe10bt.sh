#!/usr/bin/env bash
# Build the 10B-token FineWeb-Edu sample (CPU only; rerun the same command to resume).
#   INPUT=/data/fineweb-edu/sample/10BT OUT_DIR=/data/fwe10bt sbatch language_models_100m/launch/build_fwe10bt.sh
#   INPUT=... OUT_DIR=... bash language_models_100m/launch/build_fwe10bt.sh
#SBATCH --job-name=fwe10bt
#SBATCH --nodes=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
: "${INPUT:?set INPUT to the FineWeb-Edu parquet files or folder}"
: "${OUT_DIR:?set OUT_DIR to the build directory}"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}"
run "$PYTHON" -m language_models_100m.build_fwe10bt --input $INPUT --out_dir "$OUT_DIR" \
    --tokenizer "${TOKENIZER:-gpt2}" --max_tokens "${MAX_TOKENS:-10e9}" --workers "$WORKERS" ${EXTRA_ARGS:-}
