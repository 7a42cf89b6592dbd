# Sourced by the launch templates. Settings come from the environment; nothing here names
# a GPU id, a port or an absolute path. Set DRY_RUN=1 to print the command instead of running it.

HERE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$HERE_ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3 || true)"
if [ -z "$PYTHON" ]; then
    echo "error: no Python interpreter; set PYTHON" >&2
    exit 2
fi
export PYTHONPATH="$HERE_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Processes per node: NPROC, else one per visible GPU (CUDA_VISIBLE_DEVICES / Slurm binding), else 1.
gpus_visible() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# TORCHRUN (an array): krause.training.launch (torchrun whose worker failures stay one line)
# with a standalone rendezvous on one node; on several Slurm nodes one per node (srun)
# meeting at the first node of the allocation (c10d).
torchrun_command() {
    local nproc="${NPROC:-}"
    if [ -z "$nproc" ]; then
        nproc="$(gpus_visible)"
        [ "$nproc" -gt 0 ] || nproc=1
    fi
    local nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    TORCHRUN=("$PYTHON" -m krause.training.launch --nproc_per_node "$nproc"
              --signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-180}")
    if [ "$nnodes" -gt 1 ]; then
        local head="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
        local port="${MASTER_PORT:-$(( 15000 + ${SLURM_JOB_ID:-0} % 20000 ))}"
        TORCHRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${TORCHRUN[@]}" --nnodes "$nnodes"
                  --rdzv-backend c10d --rdzv-endpoint "$head:$port" --rdzv-id "${SLURM_JOB_ID:-lm}")
    else
        TORCHRUN+=(--standalone)
    fi
}

# Runs "$@" (or prints it under DRY_RUN=1), forwarding Slurm's early-warning signal and
# SIGTERM to the job so it checkpoints and exits 0; then requeues a Slurm job that was stopped.
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
        return 0
    fi
    local stopped=0 status=0
    "$@" &
    local child=$!
    trap 'stopped=1; kill -TERM '"$child"' 2>/dev/null || true' USR1 TERM
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do wait "$child" || status=$?; done
    trap - USR1 TERM
    if [ "$stopped" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${REQUEUE:-1}" = 1 ]; then
        echo "[launch] stopped by a signal: requeueing job $SLURM_JOB_ID (it resumes from its checkpoint)" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
