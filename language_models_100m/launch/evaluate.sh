#!/usr/bin/env bash
# Zero-shot lm-eval tasks + val perplexity for finished runs, and the comparison table / plot.
#   MODELS="runs/100m_gated runs/100m_standard" DATA_DIR=/data/fwe10bt sbatch language_models_100m/launch/evaluate.sh
#SBATCH --job-name=lm100m-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
require MODELS "run directories (space-separated)"
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data_dir "$DATA_DIR"); fi
run_once "$PYTHON" -m language_models_100m.evaluate --model $MODELS --out_dir "${OUT_DIR:-results/lm_eval}" \
    --tasks ${TASKS:-hellaswag piqa arc_easy blimp lambada_openai cbt} --batch_size "${BATCH_SIZE:-32}" \
    "${DATA[@]}" ${EXTRA_ARGS:-}
