#!/usr/bin/env bash
# Train one model: CONFIG in {100m, 200m}, ATTENTION in {gated, krause, standard, sliding_window, topk}.
#   CONFIG=100m ATTENTION=gated DATA_DIR=/data/fwe10bt sbatch --nodes 2 language_models_100m/launch/train.sh
#   CONFIG=100m ATTENTION=standard DATA_DIR=/data/fwe10bt bash language_models_100m/launch/train.sh
# A run directory that already holds a checkpoint is resumed (so a requeued job continues).
#SBATCH --job-name=lm100m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
require DATA_DIR "a build_fwe10bt directory"
CONFIG="${CONFIG:-100m}"
ATTENTION="${ATTENTION:-gated}"
OUT_DIR="${OUT_DIR:-runs/${CONFIG}_${ATTENTION}}"
RESUME=()
if [ -f "$OUT_DIR/checkpoints/latest" ]; then RESUME=(--resume); fi
COMPILE_FLAG=()
if [ "${COMPILE:-1}" = 1 ]; then COMPILE_FLAG=(--compile); fi
torchrun_command
note "$CONFIG $ATTENTION, $LAUNCH_PROCS, run dir $OUT_DIR"
CHECKPOINT_DIR="$OUT_DIR/checkpoints"
run_job "${TORCHRUN[@]}" -m language_models_100m.train --config "$CONFIG" --attention "$ATTENTION" \
    --data_dir "$DATA_DIR" --out_dir "$OUT_DIR" --global_batch "${GLOBAL_BATCH:-512}" \
    --micro_batch "${MICRO_BATCH:-16}" --max_tokens "${MAX_TOKENS:-10e9}" --dist "${DIST:-ddp}" \
    --eval_every "${EVAL_EVERY:-500}" "${COMPILE_FLAG[@]}" "${RESUME[@]}" ${EXTRA_ARGS:-} "$@"
