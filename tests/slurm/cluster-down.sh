#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/cluster-up.sh started: cancel its jobs, then stop exactly the daemons whose
# pid files lie in STATE_DIR (every node's slurmd, slurmctld, munged) and the job steps they left. Leaves nothing
# running; STATE_DIR (configuration and logs) stays for inspection until the next cluster-up.sh wipes it.
#
#   tests/slurm/cluster-down.sh [STATE_DIR]    # default: $HPCDL_SLURM_DIR or /var/tmp/hpcdl-slurm
set -uo pipefail

STATE_DIR=${1:-${HPCDL_SLURM_DIR:-/var/tmp/hpcdl-slurm}}
say() { echo "cluster-down: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "ERROR: must run as root"; exit 1; }
if [ ! -d "$STATE_DIR" ]; then
    say "nothing to do ($STATE_DIR does not exist)"
    exit 0
fi
export SLURM_CONF=$STATE_DIR/etc/slurm.conf

alive_pid() {  # alive_pid PIDFILE NAME: print the pid in PIDFILE if it runs a process called NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

stop() {  # stop PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local pid
    pid=$(alive_pid "$1" "$2") || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
        say "$2 ($pid) ignored SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    rm -f "$1"
    say "stopped $2 ($pid)"
}

# Jobs first: slurmstepd processes outlive slurmd, so cancel every job and wait (bounded) for their steps to go.
if alive_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        say "cancelling running jobs"
        scancel --partition=debug --full 2>/dev/null || true
        for _ in $(seq 60); do
            [ -z "$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi
for pidfile in "$STATE_DIR"/slurmd.*.pid; do
    [ -e "$pidfile" ] && stop "$pidfile" slurmd
done
stop "$STATE_DIR/slurmctld.pid" slurmctld
# Step daemons that survived (their jobs were cancelled, slurmd is gone). cluster-up.sh refuses to start beside a
# Slurm it did not start, so every slurmstepd here is this cluster's.
for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    say "killing leftover slurmstepd $pid"
    kill -KILL "$pid" 2>/dev/null || true
done
stop "$STATE_DIR/munge/munged.pid" munged
exit 0
