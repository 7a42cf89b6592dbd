#!/usr/bin/env bash
#SBATCH --job-name=krause-llm-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#
# lm-eval zero-shot evaluation (the paper's tasks) of the base model, or of ADAPTER (a LoRA
# or Krause adapter saved by lora_llms.train), then the attention-sink analysis when DATA_DIR
# is set. Results: $OUT_DIR/<LABEL>.json and tables; sinks: $OUT_DIR/sinks/<LABEL>.json.
# Direct:  MODEL_PATH=... [ADAPTER=...] [LABEL=...] [DATA_DIR=...] bash lora_llms/scripts/evaluate.sh [evaluate flags]
# Slurm:   same with sbatch.
# the checkout: this file's, or under sbatch (which runs a spool copy) the submitted file's
TEMPLATE="${BASH_SOURCE[0]}"
[ -f "$(dirname "$TEMPLATE")/../../scripts/launch/job.sh" ] || TEMPLATE="$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q}')"
source "${REPO_ROOT:-$(dirname "$TEMPLATE")/../..}/scripts/launch/job.sh"
JOB=evaluate
NAME="${NAME:-eval}"
source "$REPO_ROOT/lora_llms/scripts/launch_common.sh"
ADAPTER_ARGS=()
[ -n "${ADAPTER:-}" ] && ADAPTER_ARGS=(--adapter "$ADAPTER")
LABEL="${LABEL:-$( [ -n "${ADAPTER:-}" ] && basename "$(dirname "$ADAPTER")" || echo base )}"
note "evaluating $MODEL_PATH ${ADAPTER:+with $ADAPTER }as $LABEL -> $OUT_DIR"
run_once "$PYTHON" -m lora_llms.evaluate --model "$MODEL_PATH" ${ADAPTER_ARGS[@]+"${ADAPTER_ARGS[@]}"} \
    --label "$LABEL" --out_dir "$OUT_DIR" "$@"
if [ -n "${DATA_DIR:-}" ]; then
    run_once "$PYTHON" -m lora_llms.sinks analyze --model "$MODEL_PATH" ${ADAPTER_ARGS[@]+"${ADAPTER_ARGS[@]}"} \
        --data_dir "$DATA_DIR" --label "$LABEL" --out_dir "$OUT_DIR/sinks" ${SINKS_ARGS:-}
fi
