# Shared body of the launch templates in cifar10/ and imagenet1k/ (sourced, not run).
#
# The template sets MODEL, DATASET and the defaults below; every setting can be
# overridden from the environment, e.g.
#     DATA_PATH=/data/cifar OUT_DIR=/scratch/runs/kvit EPOCHS=100 bash vision_transformers/cifar10/run_kvit.sh
#     sbatch --gpus-per-node=4 vision_transformers/imagenet1k/run_kvit.sh --lr 6e-4
# Arguments after the script name are passed on to `python -m vision_transformers.train`.
#
# Processes: one per visible GPU (torchrun --standalone picks a free port), or one CPU
# process when there is no GPU; NPROC overrides. Several nodes: NNODES>1 under Slurm
# starts one torchrun per node with srun and a c10d rendezvous on the first node (port
# from the job id, or MASTER_PORT). Nothing here names a GPU id, a port or a path.
#
# Preemption: the job always passes --resume (a first launch simply starts), so a
# requeued job continues from its latest checkpoint (<OUT_DIR>/checkpoints/latest). Slurm's warning signal
# (#SBATCH --signal=B:USR1@180) reaches this shell, which forwards it (as SIGUSR1) to torchrun
# (and torchrun to the workers); the workers save a checkpoint and exit, then the job
# requeues itself when REQUEUE=1.

set -euo pipefail

: "${MODEL:?the template must set MODEL}"
: "${DATASET:?the template must set DATASET}"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
DATA_PATH="${DATA_PATH:-$REPO_ROOT/data/$DATASET}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/${DATASET}_${MODEL}}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
REQUEUE="${REQUEUE:-1}"

if [ ! -x "$PYTHON" ]; then
    echo "launch: no python at $PYTHON (run scripts/setup_env.sh, or set PYTHON=...)" >&2
    exit 2
fi
if [ -z "${NPROC:-}" ]; then
    NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"

TRAIN_ARGS=(--model "$MODEL" --dataset "$DATASET" --data_path "$DATA_PATH" --out_dir "$OUT_DIR" --resume)
[ -n "${EPOCHS:-}" ] && TRAIN_ARGS+=(--epochs "$EPOCHS")
[ -n "${BATCH_SIZE:-}" ] && TRAIN_ARGS+=(--batch_size "$BATCH_SIZE")
[ -n "${LR:-}" ] && TRAIN_ARGS+=(--lr "$LR")
[ -n "${NUM_WORKERS:-}" ] && TRAIN_ARGS+=(--num_workers "$NUM_WORKERS")
[ -n "${SEED:-}" ] && TRAIN_ARGS+=(--seed "$SEED")
TRAIN_ARGS+=(${TEMPLATE_ARGS[@]+"${TEMPLATE_ARGS[@]}"} "$@")

if [ "$NNODES" -gt 1 ]; then
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "launch: NNODES=$NNODES needs Slurm (srun); on one node leave NNODES unset" >&2
        exit 2
    fi
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
    LAUNCH=(srun --ntasks-per-node=1 "$PYTHON" -m krause.training.launch --nnodes "$NNODES" --nproc_per_node "$NPROC"
            --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID}")
else
    LAUNCH=("$PYTHON" -m krause.training.launch --standalone --nproc_per_node "$NPROC")
fi
# torchrun forwards these to the workers and gives them SHUTDOWN_TIMEOUT seconds to save and exit
LAUNCH+=(--signals-to-handle "SIGTERM,SIGINT,SIGUSR1" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}")

echo "launch: $MODEL on $DATASET, $NNODES node(s) x $NPROC process(es), data $DATA_PATH, run dir $OUT_DIR"
cd "$REPO_ROOT"
PREEMPTED=0
STARTED="$(date +%s)"
"${LAUNCH[@]}" -m vision_transformers.train "${TRAIN_ARGS[@]}" &
CHILD=$!
trap 'PREEMPTED=1; echo "launch: stop signal: asking the workers to save and exit" >&2; kill -USR1 "$CHILD" 2>/dev/null || true' USR1 TERM
set +e
while true; do
    wait "$CHILD"
    STATUS=$?
    # wait returns early when a trapped signal arrives; keep waiting until the job really ended
    kill -0 "$CHILD" 2>/dev/null || break
done
set -e
LAST="$OUT_DIR/checkpoints/latest"
if [ "$PREEMPTED" = 1 ] && [ -f "$LAST" ] && [ "$(stat -c %Y "$LAST")" -ge "$STARTED" ]; then
    # torchrun exits non-zero after forwarding a signal even though the workers saved and stopped cleanly
    STATUS=0
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "$REQUEUE" = 1 ]; then
        echo "launch: saved $LAST; requeueing job $SLURM_JOB_ID (it resumes from there)"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "launch: saved $LAST; run the same command again to resume"
    fi
fi
exit "$STATUS"
