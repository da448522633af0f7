#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the array script and for the tests (as root).
#
#   deploy/slurm/local-cluster.sh install      # Debian's slurm-wlm and munge, when missing (idempotent)
#   deploy/slurm/local-cluster.sh start DIR    # munged, slurmctld and slurmd, all state, logs and sockets in DIR
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch, squeue, scancel, scontrol use this cluster
#   deploy/slurm/local-cluster.sh stop DIR     # stops the three daemons started in DIR
#
# Nothing outside DIR is touched (a key, socket and ports of its own), so it runs beside a system Slurm or munge.
# proctrack/linuxproc and task/none need no cgroups, so it runs in containers and VMs as they come.
set -euo pipefail

READY_SECONDS=60  # how long `start` waits for the node to take jobs

die() { echo "local-cluster.sh: $*" >&2; exit 2; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "install: needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start() {
    local dir=$1
    [ "$(id -u)" = 0 ] || die "start: needs root (slurmd starts jobs as their users)"
    command -v slurmctld >/dev/null || die "start: Slurm is not installed; run: $0 install"
    mkdir -p "$dir/state" "$dir/spool"
    dir=$(cd "$dir" && pwd)
    chmod 700 "$dir"
    # munge: a key and socket of this cluster's own.
    [ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom >"$dir/munge.key"; chmod 400 "$dir/munge.key"; }
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    local node cpus memory
    node=$(hostname -s)
    # The node as slurmd itself measures it: its real CPU count and memory.
    cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    memory=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
    cat >"$dir/slurm.conf" <<CONF
ClusterName=localcluster
# Everything on this machine, at 127.0.0.1: no name lookup needed (containers often cannot resolve their name).
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerType=sched/backfill
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -i   # -i: no state from an earlier cluster in this folder
    slurmd
    local deadline=$((SECONDS + READY_SECONDS))
    until sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; do
        [ $SECONDS -lt $deadline ] || die "start: the node is not up after ${READY_SECONDS} s; see $dir/slurmctld.log and $dir/slurmd.log"
        sleep 1
    done
}

stop() {
    local dir=$1
    for daemon in slurmd slurmctld munged; do
        local pid_file="$dir/$daemon.pid"
        [ -f "$pid_file" ] || continue
        local pid
        pid=$(cat "$pid_file")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pid_file"
    done
}

case "${1:-}" in
    install) install_packages ;;
    start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
