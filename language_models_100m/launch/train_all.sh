#!/usr/bin/env bash
# Submit (sbatch) or run one after another (SUBMIT=0) every CONFIGS x ATTENTIONS training run.
#   DATA_DIR=/data/fwe10bt bash language_models_100m/launch/train_all.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${DATA_DIR:?set DATA_DIR to a build_fwe10bt directory}"
for config in ${CONFIGS:-100m 200m}; do
    for attention in ${ATTENTIONS:-gated krause standard sliding_window topk}; do
        if [ "${SUBMIT:-1}" = 1 ] && command -v sbatch >/dev/null; then
            CONFIG="$config" ATTENTION="$attention" sbatch --export=ALL --job-name "lm_${config}_${attention}" \
                ${SBATCH_ARGS:-} "$HERE/train.sh"
        else
            CONFIG="$config" ATTENTION="$attention" bash "$HERE/train.sh"
        fi
    done
done
