#!/usr/bin/env bash
#SBATCH --job-name=vit-imagenet1k
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# ViT-S-16 / ViT-B-16 (224/16) on ImageNet-1K: the softmax twins of KViT-S-16 / KViT-B-16 (lr 1e-3).
# Recipe (docs/recipes.md): AdamW wd 0.05, warmup 10 of 300 epochs, 256 per GPU x 4 GPUs (global batch
# 1024), RandomResizedCrop 224, HFlip, RandAugment(2, 9), RandomErasing 0.25 (B adds ColorJitter 0.4),
# CutMix/MixUp, label smoothing 0.1, bf16 autocast, channels_last, torch.compile (NO_COMPILE=1 turns it off).
# SIZE=S (default) or SIZE=B picks the model. DATA_PATH holds train/<class>/<image> and val/<class>/<image>.
# Direct:  DATA_PATH=/path/to/imagenet bash vision_transformers/imagenet1k/run_vit.sh [extra train flags]
# Slurm:   DATA_PATH=/path/to/imagenet sbatch vision_transformers/imagenet1k/run_vit.sh [extra train flags]
# Settings (environment): SIZE, DATA_PATH, OUT_DIR, EPOCHS, BATCH_SIZE (global), LR, NUM_WORKERS, SEED,
# NPROC, NNODES, PYTHON, REQUEUE, POST_NORM; see vision_transformers/launch_common.sh.
TEMPLATE_PATH=imagenet1k/run_vit.sh
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
case "${SIZE:-S}" in
    S|s) MODEL="${MODEL:-vit-s-16}" ;;
    B|b) MODEL="${MODEL:-vit-b-16}" ;;
    *) echo "imagenet1k/run_vit.sh: SIZE must be S or B, got ${SIZE}" >&2; exit 2 ;;
esac
DATASET=imagenet
TEMPLATE_ARGS=(${POST_NORM:+--norm_placement post} $( [ -n "${NO_COMPILE:-}" ] || echo --compile ))
source "$REPO_ROOT/vision_transformers/launch_common.sh"
