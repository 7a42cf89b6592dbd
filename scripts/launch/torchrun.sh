# torchrun for every launch template (sourced by scripts/launch/job.sh, not run).
#
# torchrun_command fills the array TORCHRUN with `python -m krause.training.launch` (torchrun
# whose worker failures stay one line) and these settings, written only here:
#   processes per node  NPROC, else one per visible GPU (CUDA_VISIBLE_DEVICES / Slurm's
#                       binding), else Slurm's --ntasks-per-node on a CPU node, else 1
#   nodes               NNODES, else the Slurm allocation's node count, else 1
#   rendezvous          one node: --standalone (torchrun picks a free port);
#                       several: srun starts one torchrun per node, c10d on the first node of
#                       the allocation (MASTER_ADDR overrides) at MASTER_PORT, else
#                       RDZV_PORT_BASE + job id mod 20000 (so two jobs on one node do not collide)
#   signals             SIGTERM, SIGINT and SIGUSR1 are forwarded to the workers, which save
#                       at their next step; they get SHUTDOWN_TIMEOUT seconds before SIGKILL
# OMP_NUM_THREADS defaults to the node's CPUs divided over the processes.

RDZV_PORT_BASE="${RDZV_PORT_BASE:-20000}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-180}"

visible_gpus() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

torchrun_command() {
    local nproc="${NPROC:-auto}"
    if [ "$nproc" = auto ]; then
        nproc="$(visible_gpus)"
        if [ "$nproc" -lt 1 ]; then
            nproc="${SLURM_NTASKS_PER_NODE:-1}"
            nproc="${nproc%%(*}"  # Slurm writes "2(x3)" for 2 tasks on each of 3 nodes
        fi
    fi
    local nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    local cpus
    cpus="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}"
    TORCHRUN=("$PYTHON" -m krause.training.launch --nproc_per_node "$nproc"
              --signals-to-handle SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT")
    if [ "$nnodes" -gt 1 ]; then
        if [ -z "${SLURM_JOB_ID:-}" ]; then
            echo "launch: NNODES=$nnodes needs a Slurm allocation (srun); on one node leave NNODES unset" >&2
            exit 2
        fi
        local head="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
        local port="${MASTER_PORT:-$(( RDZV_PORT_BASE + SLURM_JOB_ID % 20000 ))}"
        TORCHRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${TORCHRUN[@]}" --nnodes "$nnodes"
                  --rdzv-backend c10d --rdzv-endpoint "$head:$port" --rdzv-id "$SLURM_JOB_ID")
    else
        TORCHRUN+=(--standalone)
    fi
    LAUNCH_PROCS="$nnodes node(s) x $nproc process(es)"
}
