#!/usr/bin/env bash
#SBATCH --job-name=vit-s-cifar10
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# ViT-S (32/4) on CIFAR-10: the softmax twin of KViT-S (lr 3e-4, wd 0.05, batch 256, 300 epochs, warmup 10). POST_NORM=1: post-norm blocks, as for KViT.
# Direct:  bash vision_transformers/cifar10/run_vit.sh [extra train flags]
# Slurm:   sbatch vision_transformers/cifar10/run_vit.sh [extra train flags]
# Settings (environment): DATA_PATH, OUT_DIR, EPOCHS, BATCH_SIZE (global), LR, NUM_WORKERS, SEED, NPROC,
# NNODES, PYTHON, REQUEUE; see vision_transformers/launch_common.sh. Recipe defaults: docs/recipes.md.
TEMPLATE_PATH=cifar10/run_vit.sh
set -euo pipefail
# Repository root: from this file's location, or (under sbatch, which runs a copy of the
# script) from the submitted script's path; REPO_ROOT overrides both.
if [ -z "${REPO_ROOT:-}" ]; then
    SCRIPT="${BASH_SOURCE[0]}"
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null; then
        SCRIPT="$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')"
        SCRIPT="${SCRIPT:-${SLURM_SUBMIT_DIR:-.}/vision_transformers/${TEMPLATE_PATH}}"
    fi
    REPO_ROOT="$(cd "$(dirname "$SCRIPT")/../.." && pwd)"
fi
MODEL="${MODEL:-vit-s}"
DATASET=cifar10
TEMPLATE_ARGS=(${POST_NORM:+--norm_placement post})
source "$REPO_ROOT/vision_transformers/launch_common.sh"
