# The job side of every launch template, the same under `sbatch` and `bash` (sourced, not run).
#
# A template finds this file (under sbatch it runs as a spool copy, so from the submitted
# path that `scontrol show job` reports), sets its defaults and calls one of:
#   run_job CMD...      a preemptible run (training): Slurm's warning signal to the batch shell
#                       (#SBATCH --signal=B:USR1@...) or SIGTERM is forwarded to CMD as SIGTERM;
#                       the workers save and exit; when a save newer than the job's start is in
#                       CHECKPOINT_DIR (and FINISHED_FILE, if set, is absent) the job requeues
#                       itself under Slurm (REQUEUE=1, the default) or says to run it again
#   run_once CMD...     anything else (evaluation, sampling): runs CMD (a failure ends the script)
#   sweep_select ...    a job-array template's element (see below)
# DRY_RUN=1 prints the command (shell-quoted, one line on stdout) instead of running it.
# Settings: PYTHON (default <repo>/.venv/bin/python, else python3 on PATH), REQUEUE, DRY_RUN;
# torchrun's (NPROC, NNODES, MASTER_ADDR, MASTER_PORT, SHUTDOWN_TIMEOUT) are in torchrun.sh.
# Bad input is one line on stderr and exit status 2, before anything is written.

set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TEMPLATE="${TEMPLATE:-${BASH_SOURCE[1]:-template}}"
TEMPLATE_NAME="${TEMPLATE#"$REPO_ROOT"/}"

fail() {
    echo "launch: $*" >&2
    exit 2
}

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON="$(command -v python3 || true)"
    [ -n "$PYTHON" ] || fail "no Python at $REPO_ROOT/.venv/bin/python or on PATH (run scripts/setup_env.sh, or set PYTHON=...)"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
source "$REPO_ROOT/scripts/launch/torchrun.sh"

# require NAME WHAT: exit 2 naming the setting when the environment variable NAME is empty
require() {
    [ -n "${!1:-}" ] || fail "set $1 to $2"
}

# note MESSAGE: a progress line (stderr under DRY_RUN, whose stdout is the command alone)
note() {
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "launch: $*" >&2; else echo "launch: $*"; fi
}

dry_run() {
    printf '%q ' "$@" | sed 's/ $//'
    echo
}

run_once() {
    if [ "${DRY_RUN:-0}" = 1 ]; then dry_run "$@"; return 0; fi
    "$@"
}

# true when something directly in CHECKPOINT_DIR changed at or after epoch second $1
saved_since() {
    [ -n "${CHECKPOINT_DIR:-}" ] && [ -d "$CHECKPOINT_DIR" ] &&
        [ -n "$(find "$CHECKPOINT_DIR" -mindepth 1 -maxdepth 1 -newermt "@$(( $1 - 1 ))" -print -quit)" ]
}

run_job() {
    if [ "${DRY_RUN:-0}" = 1 ]; then dry_run "$@"; return 0; fi
    local started status=0
    started="$(date +%s)"
    STOPPED=0
    "$@" &
    CHILD=$!
    trap 'STOPPED=1; echo "launch: stop signal: asking the workers to save and exit" >&2; kill -TERM "$CHILD" 2>/dev/null || true' USR1 TERM
    wait "$CHILD" || status=$?
    # a trapped signal ends `wait` early: wait again until the child really exited
    while kill -0 "$CHILD" 2>/dev/null; do
        status=0
        wait "$CHILD" || status=$?
    done
    trap - USR1 TERM
    if [ "$STOPPED" = 1 ] && { [ -z "${FINISHED_FILE:-}" ] || [ ! -e "$FINISHED_FILE" ]; } &&
        { [ "$status" = 0 ] || saved_since "$started"; }; then
        if [ -n "${SLURM_JOB_ID:-}" ] && [ "${REQUEUE:-1}" = 1 ]; then
            echo "launch: checkpoint saved in ${CHECKPOINT_DIR:-the run dir}; requeueing job $SLURM_JOB_ID (it resumes from there)"
            scontrol requeue "$SLURM_JOB_ID"  # ends this job at once: nothing may follow
            exit 0
        fi
        echo "launch: checkpoint saved in ${CHECKPOINT_DIR:-the run dir}; run this script again to resume"
        exit 0
    fi
    exit "$status"
}

# sweep_select NAME "V1 V2 ..." [NAME "..."]...: the element SLURM_ARRAY_TASK_ID (SWEEP_INDEX
# outside Slurm) of the grid NAME1 x NAME2 x ... (the last name varies fastest). Sets each NAME
# to its value, SWEEP_SIZE, and SWEEP_NAME ("name1=v1,name2=v2", lower-case names: the element's
# run dir under the sweep folder, where `python -m krause.training.sweep` collects it).
sweep_select() {
    local names=() lists=() size=1 count
    while [ $# -gt 0 ]; do
        [ $# -ge 2 ] || fail "sweep_select: $1 has no values"
        count="$(wc -w <<<"$2")"
        [ "$count" -gt 0 ] || fail "the sweep over $1 has no values"
        names+=("$1")
        lists+=("$2")
        size=$(( size * count ))
        shift 2
    done
    SWEEP_SIZE=$size
    local index="${SWEEP_INDEX:-${SLURM_ARRAY_TASK_ID:-}}"
    if [ -z "$index" ]; then
        fail "$TEMPLATE_NAME is a job array of $size runs: submit it with sbatch --array=0-$(( size - 1 )) $TEMPLATE_NAME (or set SWEEP_INDEX)"
    fi
    [[ "$index" =~ ^[0-9]+$ ]] || fail "array index must be a whole number, got $index"
    if [ "$index" -ge "$size" ]; then
        fail "array index $index is beyond the sweep's $size runs (0-$(( size - 1 ))); nothing was written"
    fi
    SWEEP_NAME=""
    local i rest=$index values value
    for (( i = ${#names[@]} - 1; i >= 0; i-- )); do
        read -r -a values <<<"${lists[$i]}"
        value="${values[$(( rest % ${#values[@]} ))]}"
        rest=$(( rest / ${#values[@]} ))
        printf -v "${names[$i]}" '%s' "$value"
        SWEEP_NAME="${names[$i],,}=$value${SWEEP_NAME:+,$SWEEP_NAME}"
    done
}
