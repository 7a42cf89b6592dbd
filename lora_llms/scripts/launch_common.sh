# Shared body of the lora_llms launch templates (sourced, not run).
#
# The template sets JOB (train | evaluate | sinks) and its defaults; everything else comes
# from the environment:
#   MODEL_PATH  pretrained model folder or hub id (required)
#   DATA_DIR    FLAN v2 files (required for train and sinks)
#   OUT_DIR     run / results folder (default: $REPO_ROOT/runs/<template name>)
#   ADAPTER     adapter folder to evaluate / analyse (default: none = the base model)
#   NPROC       training processes (default: one per visible GPU, else 1)
#   PYTHON      interpreter (default: $REPO_ROOT/.venv/bin/python)
# Arguments after the script name go to the Python entry point unchanged.
# torchrun --standalone picks a free port; nothing here names a GPU id, a port or a path.

set -euo pipefail
: "${JOB:?the template must set JOB}"
: "${NAME:?the template must set NAME}"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/runs/$NAME}"
if [ ! -x "$PYTHON" ]; then
    echo "launch: no python at $PYTHON (run scripts/setup_env.sh, or set PYTHON=...)" >&2
    exit 2
fi
if [ -z "${MODEL_PATH:-}" ]; then
    echo "launch: set MODEL_PATH to the pretrained model (folder or hub id)" >&2
    exit 2
fi
if [ "$JOB" != evaluate ] && [ -z "${DATA_DIR:-}" ]; then
    echo "launch: set DATA_DIR to the folder of FLAN v2 files" >&2
    exit 2
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO_ROOT"
