#!/usr/bin/env bash
# A one-node Slurm on this machine, for the tests that submit the launch templates for real.
#
#   bash scripts/slurm_local.sh install   # apt-get slurm-wlm + munge when missing (root)
#   bash scripts/slurm_local.sh start     # write the config, start munged, slurmctld, slurmd; wait for an idle node
#   bash scripts/slurm_local.sh status    # exit 0 when the node answers and is idle or busy
#   bash scripts/slurm_local.sh stop      # stop what `start` started
#
# Needs root (the daemons run as root, jobs run as the submitting user). No cgroups:
# proctrack/linuxproc, task/none. The node claims 128 CPUs and 16 stand-in GPUs (character devices
# that are /dev/null)
# (SlurmdParameters=config_overrides), so the templates' own #SBATCH headers are accepted
# as written on any machine; the jobs see no GPU and run on the CPU. Accounting: the job
# completion log (jobcomp/filetxt), read with `sacct -c`. State, spool and logs live in
# SLURM_LOCAL_DIR (default /tmp/krause-slurm); the config is /etc/slurm/slurm.conf, where
# sbatch/squeue/scontrol find it.
set -euo pipefail
DIR="${SLURM_LOCAL_DIR:-/tmp/krause-slurm}"
CONF_DIR=/etc/slurm
NODE="$(hostname -s)"

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root"
    echo "slurm_local: installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool" "$CONF_DIR"
    cat > "$CONF_DIR/slurm.conf" <<EOF
# written by krause scripts/slurm_local.sh: a one-node test cluster
ClusterName=krause-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=10
MpiDefault=none
SwitchType=switch/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=128 RealMemory=128000 Gres=gpu:16 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmd counts a GPU only for a character device: stand-ins for /dev/null
    mkdir -p "$DIR/dev"
    for i in $(seq 0 15); do
        [ -c "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3 || die "cannot create the stand-in GPU devices in $DIR/dev"
    done
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/dev/gpu[0-15]\n' "$NODE" "$DIR" > "$CONF_DIR/gres.conf"
}

node_state() {
    sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

start() {
    [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
    install_packages
    if node_state | grep -q -E '^(idle|mixed|allocated)'; then
        echo "slurm_local: already running (node $NODE is $(node_state))"
        return 0
    fi
    write_config
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
        mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
        if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
    fi
    /usr/sbin/slurmctld -c  # a fresh cluster: no jobs from an earlier start
    /usr/sbin/slurmd -N "$NODE"
    local deadline=$(( $(date +%s) + ${SLURM_LOCAL_TIMEOUT:-90} ))
    until node_state | grep -q -E '^idle'; do
        if [ "$(date +%s)" -gt "$deadline" ]; then
            tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            die "node $NODE not idle after ${SLURM_LOCAL_TIMEOUT:-90} s (state: $(node_state || echo none)); logs in $DIR"
        fi
        sleep 1
    done
    echo "slurm_local: node $NODE idle (config $CONF_DIR/slurm.conf, logs $DIR)"
}

stop_pidfile() {
    local pidfile="$1"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
}

stop() {
    scancel --user="$(id -un)" 2>/dev/null || true
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    echo "slurm_local: stopped (munged left running)"
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) node_state | grep -q -E '^(idle|mixed|allocated)' ;;
    *) echo "usage: bash scripts/slurm_local.sh install|start|status|stop" >&2; exit 2 ;;
esac
