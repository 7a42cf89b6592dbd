# The vision family's part of the launch templates in cifar10/ and imagenet1k/ (sourced after
# scripts/launch/job.sh, which handles processes, rendezvous, preemption and requeue for every
# family). The template sets MODEL, DATASET and TEMPLATE_ARGS; every setting can be
# overridden from the environment, e.g.
#     DATA_PATH=/data/cifar OUT_DIR=/scratch/runs/kvit EPOCHS=100 bash vision_transformers/cifar10/run_kvit.sh
#     sbatch --gpus-per-node=4 vision_transformers/imagenet1k/run_kvit.sh --lr 6e-4
# Arguments after the script name are passed on to `python -m vision_transformers.train`.
# The job always passes --resume (a first launch simply starts), so a requeued job continues
# from <OUT_DIR>/checkpoints/latest.

: "${MODEL:?the template must set MODEL}"
: "${DATASET:?the template must set DATASET}"
DATA_PATH="${DATA_PATH:-$REPO_ROOT/data/$DATASET}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/${DATASET}_${MODEL}}"

TRAIN_ARGS=(--model "$MODEL" --dataset "$DATASET" --data_path "$DATA_PATH" --out_dir "$OUT_DIR" --resume)
[ -n "${EPOCHS:-}" ] && TRAIN_ARGS+=(--epochs "$EPOCHS")
[ -n "${BATCH_SIZE:-}" ] && TRAIN_ARGS+=(--batch_size "$BATCH_SIZE")
[ -n "${LR:-}" ] && TRAIN_ARGS+=(--lr "$LR")
[ -n "${NUM_WORKERS:-}" ] && TRAIN_ARGS+=(--num_workers "$NUM_WORKERS")
[ -n "${SEED:-}" ] && TRAIN_ARGS+=(--seed "$SEED")
TRAIN_ARGS+=(${TEMPLATE_ARGS[@]+"${TEMPLATE_ARGS[@]}"} "$@")

torchrun_command
note "$MODEL on $DATASET, $LAUNCH_PROCS, data $DATA_PATH, run dir $OUT_DIR"
CHECKPOINT_DIR="$OUT_DIR/checkpoints"
run_job "${TORCHRUN[@]}" -m vision_transformers.train "${TRAIN_ARGS[@]}"
