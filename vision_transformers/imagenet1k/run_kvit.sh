#!/usr/bin/env bash
#SBATCH --job-name=kvit-imagenet1k
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# KViT-S-16 / KViT-B-16 (224/16) on ImageNet-1K: chebyshev r=2, top-k 8..16, sigma 4.5 (S) / 8.0 (B; SIGMA=9.0 is the release script's) (lr 5e-4).
# Recipe (docs/recipes.md): AdamW wd 0.05, warmup 10 of 300 epochs, 256 per GPU x 4 GPUs (global batch
# 1024), RandomResizedCrop 224, HFlip, RandAugment(2, 9), RandomErasing 0.25 (B adds ColorJitter 0.4),
# CutMix/MixUp, label smoothing 0.1, bf16 autocast, channels_last, torch.compile (NO_COMPILE=1 turns it off).
# SIZE=S (default) or SIZE=B picks the model. DATA_PATH holds train/<class>/<image> and val/<class>/<image>.
# Direct:  DATA_PATH=/path/to/imagenet bash vision_transformers/imagenet1k/run_kvit.sh [extra train flags]
# Slurm:   DATA_PATH=/path/to/imagenet sbatch vision_transformers/imagenet1k/run_kvit.sh [extra train flags]
# Settings (environment): SIZE, DATA_PATH, OUT_DIR, EPOCHS, BATCH_SIZE (global), LR, NUM_WORKERS, SEED,
# NPROC, NNODES, PYTHON, REQUEUE, DRY_RUN, POST_NORM, SIGMA; see vision_transformers/launch_common.sh, scripts/launch/.
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
case "${SIZE:-S}" in
    S|s) MODEL="${MODEL:-kvit-s-16}" ;;
    B|b) MODEL="${MODEL:-kvit-b-16}" ;;
    *) echo "imagenet1k/run_kvit.sh: SIZE must be S or B, got ${SIZE}" >&2; exit 2 ;;
esac
DATASET=imagenet
TEMPLATE_ARGS=(${POST_NORM:+--norm_placement post} ${SIGMA:+--sigma "$SIGMA"} $( [ -n "${NO_COMPILE:-}" ] || echo --compile ))
source "$REPO_ROOT/vision_transformers/launch_common.sh"
