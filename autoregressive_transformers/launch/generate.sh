#!/usr/bin/env bash
# Unconditional samples (npz + PNG grid + throughput JSON) from a trained run, directly
# or with sbatch. Decoding is sequential over pixels, so it uses one device (no torchrun):
#
#   RUN_DIR=runs/krause_mnist bash autoregressive_transformers/launch/generate.sh
#   DATASET=cifar10 ATTN=vanilla NUM_SAMPLES=16 sbatch autoregressive_transformers/launch/generate.sh
#SBATCH --job-name=krause-ar-generate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=krause-ar-generate-%j.out
set -euo pipefail

DATASET="${DATASET:-mnist}"
ATTN="${ATTN:-krause}"
CHECKPOINT="${CHECKPOINT:-best}"   # best | last | a .pt path
NUM_SAMPLES="${NUM_SAMPLES:-64}"
BATCH_SIZE="${BATCH_SIZE:-64}"     # images decoded together
TEMPERATURE="${TEMPERATURE:-1.0}"
SEED="${SEED:-0}"
PRECISION="${PRECISION:-fp32}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

if [ -z "${REPO_ROOT:-}" ]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if [ -d "$here/autoregressive_transformers" ]; then REPO_ROOT="$here"
    elif [ -d "${SLURM_SUBMIT_DIR:-}/autoregressive_transformers" ]; then REPO_ROOT="$SLURM_SUBMIT_DIR"
    else echo "error: cannot find the repository; set REPO_ROOT" >&2; exit 2; fi
fi
source "$REPO_ROOT/autoregressive_transformers/launch/_common.sh"
RUN_DIR="${RUN_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
exec "$PYTHON" -m autoregressive_transformers.generate --run_dir "$RUN_DIR" --checkpoint "$CHECKPOINT" \
    --num_samples "$NUM_SAMPLES" --batch_size "$BATCH_SIZE" --temperature "$TEMPERATURE" --seed "$SEED" \
    --precision "$PRECISION" "${extra[@]}"
