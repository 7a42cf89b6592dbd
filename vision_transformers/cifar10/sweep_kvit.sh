#!/usr/bin/env bash
#SBATCH --job-name=kvit-s-cifar10-sweep
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#
# KViT-S on CIFAR-10 over sigma x drop-path as a Slurm job array: element i runs run_kvit.sh for
# one setting into $SWEEP_DIR/<sigma=..,drop_path=..>/ (resumed and requeued like run_kvit.sh).
# Slurm:   SIGMAS="1.5 2.5 4.0" DROP_PATHS="0.0 0.1 0.2" sbatch --array=0-8 vision_transformers/cifar10/sweep_kvit.sh
# Collect: python -m krause.training.sweep runs/cifar10_kvit-s_sweep   (sweep.md, sweep.csv, sweep.png)
# Outside Slurm it says how to submit it, or runs element SWEEP_INDEX. run_kvit.sh's settings apply.
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
sweep_select SIGMA "${SIGMAS:-1.5 2.5 4.0}" DROP_PATH "${DROP_PATHS:-0.0 0.1 0.2}"
SWEEP_DIR="${SWEEP_DIR:-$REPO_ROOT/runs/cifar10_kvit-s_sweep}"
OUT_DIR="$SWEEP_DIR/$SWEEP_NAME"
set -- --sigma "$SIGMA" --drop_path "$DROP_PATH" "$@"
source "$REPO_ROOT/vision_transformers/cifar10/run_kvit.sh"
