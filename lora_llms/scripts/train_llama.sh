#!/usr/bin/env bash
#SBATCH --job-name=krause-llama3-8b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# LoRA fine-tuning of Llama3-8B on FLAN v2: MODE=krause (default; the gated Krause mix) or
# MODE=lora (the baseline). Recipe defaults are lora_llms.train's (the paper's).
# Direct:  MODEL_PATH=... DATA_DIR=... bash lora_llms/scripts/train_llama.sh [train flags]
# Slurm:   MODEL_PATH=... DATA_DIR=... sbatch lora_llms/scripts/train_llama.sh [train flags]
NAME="${NAME:-${MODE:-krause}_llama3_8b}"
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
source "$REPO_ROOT/lora_llms/scripts/train_common.sh"
