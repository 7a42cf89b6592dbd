#!/usr/bin/env bash
#SBATCH --job-name=kvit-s-cifar10
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# KViT-S (32/4) on CIFAR-10: sigma 2.5, top-k 2..4, manhattan r=1 (lr 3e-4, wd 0.05, batch 256, 300 epochs). POST_NORM=1 uses the paper's post-norm block.
# Direct:  bash vision_transformers/cifar10/run_kvit.sh [extra train flags]
# Slurm:   sbatch vision_transformers/cifar10/run_kvit.sh [extra train flags]
# Settings (environment): DATA_PATH, OUT_DIR, EPOCHS, BATCH_SIZE (global), LR, NUM_WORKERS, SEED, NPROC,
# NNODES, PYTHON, REQUEUE, DRY_RUN; see vision_transformers/launch_common.sh and scripts/launch/. Recipe defaults: docs/recipes.md.
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
MODEL="${MODEL:-kvit-s}"
DATASET=cifar10
TEMPLATE_ARGS=(${POST_NORM:+--norm_placement post})
source "$REPO_ROOT/vision_transformers/launch_common.sh"
