# Training body of train_llama.sh / train_qwen.sh (sourced after they set NAME and REPO_ROOT).
# Preemption: the job always passes --resume (a first launch simply starts). Slurm's warning
# signal (#SBATCH --signal=B:USR1@300) reaches this shell, which forwards it to torchrun and
# the workers; they save a Trainer checkpoint and exit 0, then the job requeues itself
# (REQUEUE=1, the default under Slurm).
JOB=train
source "$REPO_ROOT/lora_llms/scripts/launch_common.sh"
MODE="${MODE:-krause}"
REQUEUE="${REQUEUE:-1}"
if [ -z "${NPROC:-}" ]; then
    NPROC="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC"
        --signals-to-handle "SIGTERM,SIGINT,SIGUSR1" --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}")
echo "launch: $MODE training of $MODEL_PATH on $DATA_DIR, $NPROC process(es), run dir $OUT_DIR"
STOPPED=0
"${LAUNCH[@]}" -m lora_llms.train --mode "$MODE" --model "$MODEL_PATH" --data_dir "$DATA_DIR" \
    --out_dir "$OUT_DIR" --resume "$@" &
CHILD=$!
trap 'STOPPED=1; echo "launch: stop signal: asking the workers to save and exit" >&2; kill -USR1 "$CHILD" 2>/dev/null || true' USR1 TERM
set +e
while true; do
    wait "$CHILD"
    STATUS=$?
    kill -0 "$CHILD" 2>/dev/null || break  # a trapped signal ends wait early: wait again
done
set -e
if [ "$STOPPED" = 1 ] && ls -d "$OUT_DIR"/checkpoints/checkpoint-* >/dev/null 2>&1; then
    STATUS=0  # torchrun exits non-zero after forwarding a signal although the workers saved
    if [ -n "${SLURM_JOB_ID:-}" ] && [ "$REQUEUE" = 1 ]; then
        echo "launch: checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "launch: checkpoint saved; run the same command again to resume"
    fi
fi
exit "$STATUS"
