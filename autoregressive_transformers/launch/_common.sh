# Shared by the launch templates (sourced, not run). Expects REPO_ROOT to be set.
# Finds the interpreter, puts the repository on PYTHONPATH and works out how many
# processes torchrun should start. Nothing here hard-codes a GPU id, port or path.

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON="$(command -v python3 || true)"
fi
if [ -z "$PYTHON" ]; then
    echo "error: no Python found; set PYTHON or run scripts/setup_env.sh" >&2
    exit 2
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Visible GPUs (honours CUDA_VISIBLE_DEVICES and Slurm's GPU binding).
NUM_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"

# bf16 on GPU, fp32 on CPU unless PRECISION says otherwise.
resolve_precision() {
    case "${PRECISION:-auto}" in
        auto) if [ "$NUM_GPUS" -gt 0 ]; then echo bf16; else echo fp32; fi ;;
        *) echo "$PRECISION" ;;
    esac
}

# torchrun command (an array named TORCHRUN; krause.training.launch is torchrun with one-line
# failures: a worker's usage error stays one line, exit 2): one process per visible GPU (or NPROC),
# a free local port on one node, a c10d rendezvous on the first Slurm node otherwise.
build_torchrun() {
    local nproc="${NPROC:-auto}"
    if [ "$nproc" = auto ]; then
        nproc=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
    fi
    local nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
    TORCHRUN=("$PYTHON" -m krause.training.launch --nproc_per_node "$nproc"
              --signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}")
    if [ "$nnodes" -gt 1 ]; then
        local addr="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
        local port="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}"
        TORCHRUN=(srun --ntasks-per-node=1 "${TORCHRUN[@]}" --nnodes "$nnodes" --rdzv-backend c10d
                  --rdzv-endpoint "$addr:$port" --rdzv-id "${SLURM_JOB_ID:-krause}")
    else
        TORCHRUN+=(--standalone)
    fi
}

# Runs "$@" in the background and forwards SIGUSR1 / SIGTERM to it (Slurm's early
# warning, see #SBATCH --signal), so training saves its checkpoint and exits cleanly.
# Sets CHILD_STATUS and SIGNALLED.
run_forwarding_signals() {
    SIGNALLED=0
    "$@" &
    local child=$!
    trap 'SIGNALLED=1; echo "[launch] signal received: asking the job to checkpoint and stop" >&2; kill -USR1 '"$child"' 2>/dev/null || true' USR1 TERM
    CHILD_STATUS=0
    wait "$child" || CHILD_STATUS=$?
    while kill -0 "$child" 2>/dev/null; do
        CHILD_STATUS=0
        wait "$child" || CHILD_STATUS=$?
    done
    trap - USR1 TERM
}
