#!/usr/bin/env bash
# Test-set bits per dimension of a trained run under torchrun (each process scores a
# share of the images; the sums are combined), directly or with sbatch:
#
#   RUN_DIR=runs/krause_cifar10 bash autoregressive_transformers/launch/evaluate.sh
#SBATCH --job-name=krause-ar-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=krause-ar-eval-%j.out
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"

DATASET="${DATASET:-mnist}"
ATTN="${ATTN:-krause}"
CHECKPOINT="${CHECKPOINT:-best}"   # best | last | a .pt path
SPLIT="${SPLIT:-test}"
BATCH_SIZE="${BATCH_SIZE:-32}"     # per process
PRECISION="${PRECISION:-fp32}"
NPROC="${NPROC:-auto}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

RUN_DIR="${RUN_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
torchrun_command
run_once "${TORCHRUN[@]}" -m autoregressive_transformers.evaluate --run_dir "$RUN_DIR" --checkpoint "$CHECKPOINT" \
    --split "$SPLIT" --batch_size "$BATCH_SIZE" --precision "$PRECISION" "${extra[@]}"
