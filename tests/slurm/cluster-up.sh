#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this Debian host for the Slurm tests (tests/test_slurm.py):
# munged + slurmctld + slurmd, all as root, one partition `debug`, MpiDefault=pmix, no accounting.
#
#   tests/slurm/cluster-up.sh [STATE_DIR]      # default: $HPCDL_SLURM_DIR or /tmp/hpcdl-slurm
#   tests/slurm/cluster-down.sh [STATE_DIR]    # stops exactly what this started (pid files in STATE_DIR)
#
# What it does, each step idempotent (running it on an up cluster only waits for the node and exits 0):
#   - apt-get installs slurm-wlm, munge and libpmix2 when missing (Debian, root only);
#   - creates the unprivileged test user `hpcdl-ci` (override: HPCDL_SLURM_USER) that the tests submit as;
#   - writes /etc/slurm/slurm.conf and /etc/slurm/mpi.conf for THIS host (node name `hostname -s`, CPUs from
#     nproc, RealMemory from free) with a marker line; a slurm.conf without the marker belongs to someone else
#     and is never overwritten (the script stops instead);
#   - starts munged (unless a munge daemon already answers), slurmctld and slurmd in the background with their
#     logs and pid files under STATE_DIR, and waits (bounded: HPCDL_SLURM_WAIT seconds, default 60) until `sinfo`
#     shows the node idle; on failure it prints the daemons' logs and exits non-zero.
# Deliberately test-only: no accounting (sacct fails; the Snakemake executor polls with squeue), task/none and
# proctrack/linuxproc (no cgroups needed, works in containers), short timeouts, scheduling on every event.
set -euo pipefail

STATE_DIR=${1:-${HPCDL_SLURM_DIR:-/tmp/hpcdl-slurm}}
TEST_USER=${HPCDL_SLURM_USER:-hpcdl-ci}
WAIT_S=${HPCDL_SLURM_WAIT:-60}
PARTITION=debug
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# hpcdl test cluster: written by tests/slurm/cluster-up.sh"

say() { echo "cluster-up: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts slurmctld/slurmd/munged)"
[ -r /etc/debian_version ] || die "only Debian is supported (apt-get packages slurm-wlm and munge)"

# Packages --------------------------------------------------------------------------------------------------
missing=""
for pkg in slurm-wlm munge libpmix2; do  # libpmix2: dlopened by mpi/pmix (Open MPI pulls it in too)
    dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    say "installing$missing (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The unprivileged submitter --------------------------------------------------------------------------------
if ! id -u "$TEST_USER" >/dev/null 2>&1; then
    say "creating user $TEST_USER"
    useradd --create-home --shell /bin/bash --user-group "$TEST_USER"
fi

mkdir -p "$STATE_DIR"
chmod 755 "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool" "$STATE_DIR/munge"

alive() {  # alive PIDFILE NAME: the pid in PIDFILE runs a process called NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

show_logs() {
    local f
    for f in "$STATE_DIR"/munge/munged.log "$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd.log \
             "$STATE_DIR"/slurmctld.out "$STATE_DIR"/slurmd.out; do
        [ -s "$f" ] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
    echo "----- sinfo -----" >&2
    sinfo -N -l >&2 2>&1 || true
}

# munge -----------------------------------------------------------------------------------------------------
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_works; then
    :  # a munge daemon (ours from an earlier call, or the system's) already answers
else
    [ -s /etc/munge/munge.key ] || {
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none; fi
    }
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 "$STATE_DIR/munge"
    install -d -o munge -g munge -m 0711 /var/lib/munge
    # munged checks that only its owner can write its directories, so it runs as its own user, as on Debian.
    runuser -u munge -- /usr/sbin/munged --force \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/munge/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" ||
        { cat "$STATE_DIR/munge/munged.log" >&2 2>/dev/null; die "munged did not start"; }
    for _ in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || { cat "$STATE_DIR/munge/munged.log" >&2; die "munged started but munge/unmunge fails"; }
fi

# Already up? -----------------------------------------------------------------------------------------------
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }
NODE=$(hostname -s)
if alive "$STATE_DIR/slurmctld.pid" slurmctld && alive "$STATE_DIR/slurmd.pid" slurmd; then
    say "already up (pid files in $STATE_DIR)"
else
    # Configuration for this host ---------------------------------------------------------------------------
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: this host has its own Slurm; not touching it"
    fi
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
        die "slurmctld/slurmd already run here but not from $STATE_DIR (pid files); stop them first"
    fi
    CPUS=$(nproc)
    MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
    REAL_MEM=$((MEM_TOTAL * 90 / 100))   # a margin, else slurmd drains the node for "Low RealMemory"
    mkdir -p "$CONF_DIR"
    cat >"$CONF.tmp" <<EOF
$MARKER
# Single-node test cluster for host $NODE; state and logs in $STATE_DIR. Not for production use.
ClusterName=hpcdl
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups: works in containers and gVisor sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmix
SwitchType=switch/none
# No accounting: sacct fails; the Snakemake executor polls squeue (profiles/slurm-test).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Short timeouts so that the node comes up and jobs start and end quickly.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
BatchStartTimeout=20
InactiveLimit=0
KillWait=5
UnkillableStepTimeout=30
Waittime=0
ReturnToService=2
# Finished jobs stay visible to squeue this long: the executor's squeue status polling needs it to be at least
# 3 x its init-seconds-before-status-checks, or it falls back to sacct.
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=0,batch_sched_delay=0,default_queue_depth=200
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=04:00:00 DefaultTime=01:00:00 State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    # PMIx's shared-memory dstore (gds ds12) fails with lock errors for ranks in containers / user namespaces
    # (field notes); the hash component works everywhere. Host ranks work either way here (checked); slurmd
    # exports this to every rank of an `srun --mpi=pmix` step, so the launchers need not set it.
    cat >"$CONF_DIR/mpi.conf" <<EOF
$MARKER
PMIxEnv=PMIX_MCA_gds=hash
EOF
    rm -f "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmd.pid"

    # Daemons -----------------------------------------------------------------------------------------------
    # -i: ignore state left by an earlier run of this test cluster (start with no jobs).
    /usr/sbin/slurmctld -i >"$STATE_DIR/slurmctld.out" 2>&1 || { show_logs; die "slurmctld did not start"; }
    for _ in $(seq 100); do alive "$STATE_DIR/slurmctld.pid" slurmctld && break; sleep 0.1; done
    alive "$STATE_DIR/slurmctld.pid" slurmctld || { show_logs; die "slurmctld exited"; }
    /usr/sbin/slurmd >"$STATE_DIR/slurmd.out" 2>&1 || { show_logs; die "slurmd did not start"; }
    for _ in $(seq 100); do alive "$STATE_DIR/slurmd.pid" slurmd && break; sleep 0.1; done
    alive "$STATE_DIR/slurmd.pid" slurmd || { show_logs; die "slurmd exited"; }
fi

# Wait for the node ---------------------------------------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*|drained*|fail*)
            # e.g. a node left down by an earlier run: ReturnToService=2 normally handles it; nudge it once.
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated) ;;
    *) show_logs; die "node $NODE not idle after ${WAIT_S}s (state: '${state:-no answer from slurmctld}')" ;;
esac
say "up: node $NODE ($state), partition $PARTITION, state in $STATE_DIR"
