# Training body of train_llama.sh / train_qwen.sh (sourced after they set NAME and found the
# checkout). The job always passes --resume (a first launch simply starts); on Slurm's warning
# signal the workers save a Trainer checkpoint in $OUT_DIR/checkpoints and exit 0, then the
# job requeues itself (scripts/launch/job.sh).
JOB=train
source "$REPO_ROOT/lora_llms/scripts/launch_common.sh"
MODE="${MODE:-krause}"
torchrun_command
note "$MODE training of $MODEL_PATH on $DATA_DIR, $LAUNCH_PROCS, run dir $OUT_DIR"
CHECKPOINT_DIR="$OUT_DIR/checkpoints"
run_job "${TORCHRUN[@]}" -m lora_llms.train --mode "$MODE" --model "$MODEL_PATH" --data_dir "$DATA_DIR" \
    --out_dir "$OUT_DIR" --resume "$@"
