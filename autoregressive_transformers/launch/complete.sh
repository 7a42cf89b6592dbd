#!/usr/bin/env bash
# Image completion from the top FRACTION of test images (figure, arrays, and the NLL of
# the true rest) with a trained run, directly or with sbatch; one device (no torchrun):
#
#   RUN_DIR=runs/krause_mnist bash autoregressive_transformers/launch/complete.sh
#   DATASET=cifar10 DATA_PATH=/data/cifar10 FRACTION=0.5 sbatch autoregressive_transformers/launch/complete.sh
#SBATCH --job-name=krause-ar-complete
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --output=krause-ar-complete-%j.out
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"

DATASET="${DATASET:-mnist}"
ATTN="${ATTN:-krause}"
CHECKPOINT="${CHECKPOINT:-best}"
FRACTION="${FRACTION:-0.5}"        # fraction of the rows given, in (0, 1)
NUM_IMAGES="${NUM_IMAGES:-8}"
NUM_SAMPLES="${NUM_SAMPLES:-4}"    # completions per image
BATCH_SIZE="${BATCH_SIZE:-64}"
TEMPERATURE="${TEMPERATURE:-1.0}"
SEED="${SEED:-0}"
DATA_PATH="${DATA_PATH:-}"         # empty: the training run's
PRECISION="${PRECISION:-fp32}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

RUN_DIR="${RUN_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

args=(--run_dir "$RUN_DIR" --checkpoint "$CHECKPOINT" --fraction "$FRACTION" --num_images "$NUM_IMAGES"
      --num_samples "$NUM_SAMPLES" --batch_size "$BATCH_SIZE" --temperature "$TEMPERATURE" --seed "$SEED"
      --precision "$PRECISION")
[ -n "$DATA_PATH" ] && args+=(--data_path "$DATA_PATH")
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)
run_once "$PYTHON" -m autoregressive_transformers.complete "${args[@]}" "${extra[@]}"
