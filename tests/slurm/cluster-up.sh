#!/usr/bin/env bash
# Bring up a real multi-node Slurm test cluster on this one Debian host, for the Slurm tests (tests/test_slurm*.py):
# munged + slurmctld + N slurmd (nodes n1..nN, default 2), partition `debug`, MpiDefault=pmix, no accounting.
#
#   tests/slurm/cluster-up.sh [STATE_DIR]      # default: $HPCDL_SLURM_DIR or /var/tmp/hpcdl-slurm
#   tests/slurm/cluster-down.sh [STATE_DIR]    # stops exactly what this started (pid files in STATE_DIR)
#   SLURM_CONF=STATE_DIR/etc/slurm.conf sinfo  # client commands on this host
#
# Several nodes on one machine (the recipe of FIELD-NOTES, checked with Debian 12's Slurm 22.05 and Open MPI 4.1):
# each slurmd runs in its own UTS and mount namespace (`unshare --uts --mount`), so it has its own host name (nX)
# and its own node-local /tmp (STATE_DIR/nodes/nX/tmp bound over /tmp: Slurm's PMIx plugin and Open MPI keep
# per-node files there, which collide on a shared /tmp). All nodes share the network (per-node slurmd ports) and
# every other folder, which plays the cluster's shared file system. In each node's namespace /etc/hosts also
# names every node (n1..nN resolve to 127.0.0.1, as node names resolve on a real cluster) and /etc/slurm is
# STATE_DIR/etc: the Snakemake executor removes SLURM_CONF inside jobs, and an srun in a job then reads
# /etc/slurm/slurm.conf.
#
# Nothing outside STATE_DIR is changed on the host: the configuration, munge's key and socket, the daemons' logs
# and pid files all live there; the host's /etc/slurm, /etc/munge and /etc/hosts are untouched. The only
# machine-wide effect is installing the Debian packages slurm-wlm, munge and libpmix2 when missing (idempotent).
# Each call starts from nothing: a cluster already running from STATE_DIR is stopped first, its state wiped.
# Deliberately test-only: no accounting (sacct fails; the Snakemake executor polls with squeue), task/none and
# proctrack/linuxproc (no cgroups, works in containers and gVisor), short timeouts, scheduling on every event.
set -euo pipefail

STATE_DIR=${1:-${HPCDL_SLURM_DIR:-/var/tmp/hpcdl-slurm}}
NODES=${HPCDL_SLURM_NODES:-2}
WAIT_S=${HPCDL_SLURM_WAIT:-60}
PARTITION=debug
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { echo "cluster-up: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts slurmctld/slurmd/munged)"
[ -r /etc/debian_version ] || die "only Debian is supported (apt-get packages slurm-wlm and munge)"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "HPCDL_SLURM_NODES must be a positive integer, not '$NODES'"

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
[ -d /etc/slurm ] || die "/etc/slurm is missing (the slurm-wlm package creates it): nodes bind their configuration there"

# From nothing: stop a cluster of this STATE_DIR that still runs, drop its state ------------------------------
if [ -d "$STATE_DIR" ]; then
    bash "$HERE/cluster-down.sh" "$STATE_DIR" >&2 || true
    rm -rf "$STATE_DIR"
fi
pgrep -x slurmctld >/dev/null && die "a slurmctld not started from $STATE_DIR runs here; stop it first"
mkdir -p "$STATE_DIR"
chmod 755 "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
CONF_DIR=$STATE_DIR/etc
CONF=$CONF_DIR/slurm.conf
MUNGE=$STATE_DIR/munge
mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool" "$CONF_DIR"

alive() {  # alive PIDFILE NAME: the pid in PIDFILE runs a process called NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

show_logs() {
    local f
    for f in "$MUNGE"/munged.log "$STATE_DIR"/*.log "$STATE_DIR"/*.out; do
        [ -s "$f" ] || continue
        echo "----- $f (last 40 lines) -----" >&2
        tail -n 40 "$f" >&2
    done
    echo "----- sinfo -----" >&2
    SLURM_CONF=$CONF sinfo -N -l >&2 2>&1 || true
}

# munge: a key and a socket of this cluster's own --------------------------------------------------------------
install -d -o munge -g munge -m 0711 "$MUNGE"
runuser -u munge -- dd if=/dev/urandom of="$MUNGE/munge.key" bs=1 count=128 status=none
chmod 0400 "$MUNGE/munge.key"
# munged checks that only its owner can write its folders, so it runs as its own user, as on Debian.
runuser -u munge -- /usr/sbin/munged --force --key-file="$MUNGE/munge.key" --socket="$MUNGE/munge.socket" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" ||
    { cat "$MUNGE/munged.log" >&2 2>/dev/null; die "munged did not start"; }
munge_works() { munge -S "$MUNGE/munge.socket" -n 2>/dev/null | unmunge -S "$MUNGE/munge.socket" >/dev/null 2>&1; }
for _ in $(seq 50); do munge_works && break; sleep 0.1; done
munge_works || { cat "$MUNGE/munged.log" >&2; die "munged started but munge/unmunge fails"; }

# Configuration -------------------------------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
REAL_MEM=$((MEM_TOTAL * 90 / 100 / NODES))   # a margin, else slurmd drains a node for "Low RealMemory"
NODE_NAMES=$(seq -f "n%g" -s, 1 "$NODES")
{
    echo "# hpcdl test cluster of $NODES node(s) on host $HOST, written by tests/slurm/cluster-up.sh; state and logs in $STATE_DIR."
    cat <<EOF
ClusterName=hpcdl
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.socket
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
# No cgroups: works in containers and gVisor sandboxes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmix
SwitchType=switch/none
# No accounting: sacct fails; the Snakemake executor polls squeue (profiles/slurm-test).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Short timeouts so that nodes come up, jobs start and end, and a lost node is noticed quickly.
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
EOF
    for i in $(seq "$NODES"); do
        echo "NodeName=n$i NodeAddr=127.0.0.1 Port=$((6830 + i)) CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=$NODE_NAMES Default=YES MaxTime=04:00:00 DefaultTime=01:00:00 State=UP OverSubscribe=NO"
} > "$CONF"
# PMIx's shared-memory dstore (gds ds12) fails with lock errors for ranks in containers / user namespaces; the hash
# component works everywhere. slurmd exports this to every rank of an `srun --mpi=pmix` step.
echo "PMIxEnv=PMIX_MCA_gds=hash" > "$CONF_DIR/mpi.conf"
chmod -R a+rX "$CONF_DIR"

# Nodes: each slurmd in its own UTS + mount namespace ---------------------------------------------------------------
{ echo "127.0.0.1 localhost $HOST ${NODE_NAMES//,/ }"; echo "::1 localhost ip6-localhost ip6-loopback"; } > "$STATE_DIR/hosts"
chmod 644 "$STATE_DIR/hosts"
/usr/sbin/slurmctld -f "$CONF" -i >"$STATE_DIR/slurmctld.out" 2>&1 || { show_logs; die "slurmctld did not start"; }
for _ in $(seq 100); do alive "$STATE_DIR/slurmctld.pid" slurmctld && break; sleep 0.1; done
alive "$STATE_DIR/slurmctld.pid" slurmctld || { show_logs; die "slurmctld exited"; }
for i in $(seq "$NODES"); do
    node=n$i
    mkdir -p "$STATE_DIR/nodes/$node/tmp" "$STATE_DIR/spool/$node"
    chmod 1777 "$STATE_DIR/nodes/$node/tmp"
    unshare --uts --mount --propagation private bash -c '
        set -e
        mount --bind "$1/nodes/$2/tmp" /tmp
        mount --bind "$1/hosts" /etc/hosts
        mount --bind "$1/etc" /etc/slurm
        hostname "$2"
        exec /usr/sbin/slurmd -f /etc/slurm/slurm.conf -N "$2"' _ "$STATE_DIR" "$node" >"$STATE_DIR/slurmd.$node.out" 2>&1 ||
        { show_logs; die "slurmd of $node did not start"; }
done
for i in $(seq "$NODES"); do
    for _ in $(seq 100); do alive "$STATE_DIR/slurmd.n$i.pid" slurmd && break; sleep 0.1; done
    alive "$STATE_DIR/slurmd.n$i.pid" slurmd || { show_logs; die "slurmd of n$i exited"; }
done

# Wait for the nodes ------------------------------------------------------------------------------------------------
export SLURM_CONF=$CONF
deadline=$((SECONDS + WAIT_S))
while [ $SECONDS -lt $deadline ]; do
    states=$(sinfo -h -N -p "$PARTITION" -o "%N %T" 2>/dev/null | sort -u)
    ready=$(grep -cE " (idle|mixed|allocated)$" <<<"$states" || true)
    [ "$ready" -eq "$NODES" ] && break
    sleep 0.5
done
[ "${ready:-0}" -eq "$NODES" ] || { show_logs; die "not all $NODES nodes idle after ${WAIT_S}s: ${states:-no answer from slurmctld}"; }
say "up: nodes $NODE_NAMES idle, partition $PARTITION; SLURM_CONF=$CONF"
