# The lora_llms family's part of its launch templates (sourced after scripts/launch/job.sh,
# which handles processes, preemption and requeue for every family).
#
# The template sets JOB (train | evaluate) and NAME; everything else comes from the environment:
#   MODEL_PATH  pretrained model folder or hub id (required)
#   DATA_DIR    FLAN v2 files (required for train)
#   OUT_DIR     run / results folder (default: $REPO_ROOT/runs/<NAME>)
#   ADAPTER     adapter folder to evaluate / analyse (default: none = the base model)
#   NPROC       training processes (default: one per visible GPU, else 1)
#   PYTHON      interpreter (default: $REPO_ROOT/.venv/bin/python)
# Arguments after the script name go to the Python entry point unchanged.

: "${JOB:?the template must set JOB}"
: "${NAME:?the template must set NAME}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/$NAME}"
require MODEL_PATH "the pretrained model (folder or hub id)"
[ "$JOB" = evaluate ] || require DATA_DIR "the folder of FLAN v2 files"
