#!/usr/bin/env bash
# Build the 10B-token FineWeb-Edu sample (CPU only; rerun the same command to resume).
#   INPUT=/data/fineweb-edu/sample/10BT OUT_DIR=/data/fwe10bt sbatch language_models_100m/launch/build_fwe10bt.sh
#   INPUT=... OUT_DIR=... bash language_models_100m/launch/build_fwe10bt.sh
#SBATCH --job-name=fwe10bt
#SBATCH --nodes=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
require INPUT "the FineWeb-Edu parquet files or folder"
require OUT_DIR "the build directory"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}"
CHECKPOINT_DIR="$OUT_DIR"  # the build resumes from its finished shards
run_job "$PYTHON" -m language_models_100m.build_fwe10bt --input $INPUT --out_dir "$OUT_DIR" \
    --tokenizer "${TOKENIZER:-gpt2}" --max_tokens "${MAX_TOKENS:-10e9}" --workers "$WORKERS" ${EXTRA_ARGS:-}
