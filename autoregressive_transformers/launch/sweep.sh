#!/usr/bin/env bash
# The KARM sweep over sigma x window x dropout as a Slurm job array: element i trains one
# setting with train.sh into $SWEEP_DIR/<sigma=..,window=..,dropout=..>/ (resumable and
# requeued on preemption like train.sh), e.g. 3 x 3 x 2 = 18 elements:
#
#   SWEEP_DIR=runs/karm_sweep sbatch --array=0-17 autoregressive_transformers/launch/sweep.sh
#   SIGMAS="2.5" WINDOWS="64 128" DROPOUTS="0.1" sbatch --array=0-1 autoregressive_transformers/launch/sweep.sh
#   python -m krause.training.sweep runs/karm_sweep      # table (sweep.md, sweep.csv) and plot (sweep.png)
#
# Run outside Slurm it says how to submit it (or runs element SWEEP_INDEX). Every train.sh
# setting applies to all elements (DATASET, ATTN, EPOCHS, EXTRA_ARGS, ...).
#SBATCH --job-name=krause-ar-sweep
#SBATCH --array=0-17
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=krause-ar-sweep-%A_%a.out
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"

sweep_select SIGMA "${SIGMAS:-1.5 2.5 3.5}" WINDOW "${WINDOWS:-64 128 256}" DROPOUT "${DROPOUTS:-0.0 0.1}"
SWEEP_DIR="${SWEEP_DIR:-$REPO_ROOT/runs/sweep_${ATTN:-krause}_${DATASET:-mnist}}"
OUT_DIR="$SWEEP_DIR/$SWEEP_NAME"
EXTRA_ARGS="--sigma $SIGMA --window $WINDOW --dropout $DROPOUT ${EXTRA_ARGS:-}"
source "$REPO_ROOT/autoregressive_transformers/launch/train.sh"
