#!/usr/bin/env bash
#SBATCH --job-name=swin-t-cifar10
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Swin-T (window 4, maps 8-4-2-1) on CIFAR-10: the softmax twin of KSwin-T (lr 2e-3, wd 0.01, warmup 20, RandomErasing 0.25).
# Direct:  bash vision_transformers/cifar10/run_swin.sh [extra train flags]
# Slurm:   sbatch vision_transformers/cifar10/run_swin.sh [extra train flags]
# Settings (environment): DATA_PATH, OUT_DIR, EPOCHS, BATCH_SIZE (global), LR, NUM_WORKERS, SEED, NPROC,
# NNODES, PYTHON, REQUEUE, DRY_RUN; see vision_transformers/launch_common.sh and scripts/launch/. Recipe defaults: docs/recipes.md.
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
MODEL="${MODEL:-swin-t}"
DATASET=cifar10
TEMPLATE_ARGS=()
source "$REPO_ROOT/vision_transformers/launch_common.sh"
