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
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"

DATASET="${DATASET:-mnist}"
ATTN="${ATTN:-krause}"
CHECKPOINT="${CHECKPOINT:-best}"   # best | last | a .pt path
NUM_SAMPLES="${NUM_SAMPLES:-64}"
BATCH_SIZE="${BATCH_SIZE:-64}"     # images decoded together
TEMPERATURE="${TEMPERATURE:-1.0}"
SEED="${SEED:-0}"
PRECISION="${PRECISION:-fp32}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

RUN_DIR="${RUN_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
run_once "$PYTHON" -m autoregressive_transformers.generate --run_dir "$RUN_DIR" --checkpoint "$CHECKPOINT" \
    --num_samples "$NUM_SAMPLES" --batch_size "$BATCH_SIZE" --temperature "$TEMPERATURE" --seed "$SEED" \
    --precision "$PRECISION" "${extra[@]}"
