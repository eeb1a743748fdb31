#!/usr/bin/env bash
# Bring up / tear down a real single-node Slurm cluster on localhost for tests.
#
#   eval "$(tests/slurm/cluster.sh start STATE_DIR)"   # prints: export SLURM_CONF=STATE_DIR/slurm.conf
#   ... sbatch / srun / squeue / scontrol ...
#   tests/slurm/cluster.sh stop STATE_DIR
#   tests/slurm/cluster.sh status STATE_DIR              # exit 0 iff all daemons alive
#
# Must run as root (Debian/Ubuntu). stdout of `start` is ONLY the export line;
# all progress/diagnostics go to stderr. Everything (config, munge socket,
# state, spool, logs, pid files) lives under STATE_DIR; nothing is written to
# /etc/slurm. The only system-wide side effects are the Debian packages and
# /etc/munge/munge.key (created only if missing).
#
# Environment knobs (optional):
#   SLURM_TEST_CTLD_PORT    slurmctld port (default 6817)
#   SLURM_TEST_SLURMD_PORT  slurmd port    (default 6818)
#   SLURM_TEST_CRED_EXPIRE  AuthInfo cred_expire = seconds a requeued job waits
#                           before it may start again (default 5, Slurm min 5)
#   SLURM_TEST_MIN_JOB_AGE  MinJobAge: seconds finished jobs stay in squeue/scontrol
#                           (default 4; larger values slow down sbatch --wait)
#   SLURM_TEST_KILLWAIT     KillWait: SIGTERM->SIGKILL grace on cancel/timeout (default 5)
#   SLURM_TEST_DEBUG        SlurmctldDebug/SlurmdDebug level (default info)
#   SLURM_TEST_START_TIMEOUT seconds to wait for the node to become idle (default 60)

set -euo pipefail

PROG="cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
MUNGE_KEY=/etc/munge/munge.key

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: ERROR: $*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 start STATE_DIR   # start (idempotent); prints 'export SLURM_CONF=...'
       $0 stop STATE_DIR    # cancel jobs, kill the daemons started by 'start'
       $0 status STATE_DIR  # exit 0 iff munged, slurmctld and slurmd are alive
EOF
    exit 2
}

# ---------------------------------------------------------------- helpers --

# alive PID NAME: true if PID exists, is not a zombie, and its comm is NAME.
# (zombie check matters: in containers PID 1 often does not reap orphans, so
# `kill -0` keeps succeeding on dead daemons.)
alive() {
    local pid=$1 name=$2 stat comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    comm=${stat#*(}; comm=${comm%)*}
    [[ $comm == "$name"* ]] || return 1
    local rest=${stat##*) }
    [[ ${rest:0:1} != Z && ${rest:0:1} != X ]]
}

read_pid() { [[ -s $1 ]] && tr -dc 0-9 <"$1" || true; }

# wait_gone PID NAME SECONDS: wait until PID is no longer an alive NAME.
wait_gone() {
    local pid=$1 name=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" "$name" || return 0
        sleep 0.1
    done
    return 1
}

# kill_pid PID NAME: TERM, wait up to 15s, then KILL.
kill_pid() {
    local pid=$1 name=$2
    alive "$pid" "$name" || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$name" 15; then
        log "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" "$name" 5 || die "$name (pid $pid) still alive after SIGKILL"
    fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

set_paths() {
    [[ -n ${1:-} ]] || usage
    mkdir -p "$1"
    STATE_DIR=$(cd "$1" && pwd -P)
    [[ $STATE_DIR != *[[:space:]\#]* ]] || die "STATE_DIR must not contain whitespace or '#': $STATE_DIR"
    CONF=$STATE_DIR/slurm.conf
    LOGDIR=$STATE_DIR/log
    MUNGE_DIR=$STATE_DIR/munge
    MUNGE_SOCK=$MUNGE_DIR/munge.socket.2
    MUNGE_PIDFILE=$MUNGE_DIR/munged.pid
    CTLD_PIDFILE=$STATE_DIR/slurmctld.pid
    SLURMD_PIDFILE=$STATE_DIR/slurmd.pid
    CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
    SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
}

dump_logs() {
    local f
    for f in "$LOGDIR"/munged.log "$LOGDIR"/slurmctld.stdout "$LOGDIR"/slurmctld.log \
        "$LOGDIR"/slurmd.stdout "$LOGDIR"/slurmd.log; do
        [[ -s $f ]] || continue
        echo "----- tail $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# ------------------------------------------------------------ installation --

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` once, only if the package lists don't know the packages.
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        log "apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
    fi
    if ! apt-get install -y -q "${missing[@]}" >&2; then
        log "install failed; retrying after apt-get update"
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install -y -q "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
    for p in slurmctld slurmd sbatch srun sinfo scontrol munged munge; do
        command -v "$p" >/dev/null || die "$p not found after installing packages"
    done
}

ensure_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
}

# ------------------------------------------------------------------ config --

write_conf() {
    local node cpus memmb
    node=$(hostname -s)
    cpus=$(nproc)
    memmb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    ((memmb > 0)) || memmb=1000
    NODE=$node
    cat >"$CONF.tmp" <<EOF
# Generated by tests/slurm/cluster.sh -- single-node test cluster.
ClusterName=testcluster
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Private munged socket. cred_expire is also how long a requeued job is held
# (BeginTime) before it may start again: default 120s, Slurm minimum 5s.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=${SLURM_TEST_CRED_EXPIRE:-5}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Main scheduling loop every 1s (default 60s) so that a requeued job starts
# promptly once its BeginTime (cred_expire) has passed.
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
# No mail on this box; silences "Configured MailProg is invalid".
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
# Timeouts
MessageTimeout=5
TCPTimeout=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=${SLURM_TEST_KILLWAIT:-5}
Waittime=0
# How long finished jobs stay visible to squeue/"scontrol show job" (seconds;
# Slurm clamps values < 2 to 2, so 0 does NOT mean "keep forever" in 22.05).
# Small on purpose: "sbatch --wait" polls every 2s but quadruples its poll
# interval (2,8,32,32..s) while it is < MinJobAge/2, so with the default 300
# a 12s job takes ~42s to return under --wait; with 4 it takes ~14s.
# Permanent record of finished jobs: JobCompLoc below.
MinJobAge=${SLURM_TEST_MIN_JOB_AGE:-4}
# No accounting daemon: sacct does not work; use scontrol show job or the
# jobcomp log below (one line per finished/requeued job with JobState=...).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
# State / spool / logs / pids
StateSaveLocation=$STATE_DIR/ctld-state
SlurmdSpoolDir=$STATE_DIR/slurmd-spool
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=${SLURM_TEST_DEBUG:-info}
SlurmdDebug=${SLURM_TEST_DEBUG:-info}
# Node / partition
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$memmb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# ----------------------------------------------------------------- start ----

all_alive() {
    alive "$(read_pid "$MUNGE_PIDFILE")" munged &&
        alive "$(read_pid "$CTLD_PIDFILE")" slurmctld &&
        alive "$(read_pid "$SLURMD_PIDFILE")" slurmd
}

start_failed() {
    log "start failed: $*"
    dump_logs
    log "cleaning up partially started cluster"
    do_stop >/dev/null 2>&1 || true
    exit 1
}

# wait_pidfile FILE NAME SECONDS
wait_pidfile() {
    local file=$1 name=$2 secs=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$(read_pid "$file")" "$name" && return 0
        sleep 0.1
    done
    return 1
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    local t0=$SECONDS
    ensure_packages
    ensure_munge_key

    if [[ -f $CONF ]] && all_alive; then
        if SLURM_CONF=$CONF timeout 10 sinfo -h >/dev/null 2>&1; then
            log "cluster already running in $STATE_DIR"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
    fi
    # Anything half-alive from a previous start in this STATE_DIR: stop it.
    [[ -f $CONF ]] && do_stop >/dev/null 2>&1 || true

    for p in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_in_use "$p" && die "port $p on 127.0.0.1 is already in use (another slurm?); set SLURM_TEST_CTLD_PORT/SLURM_TEST_SLURMD_PORT"
    done

    mkdir -p "$LOGDIR" "$MUNGE_DIR" "$STATE_DIR/ctld-state" "$STATE_DIR/slurmd-spool"
    chmod 0755 "$STATE_DIR" "$LOGDIR" "$MUNGE_DIR"
    write_conf
    export SLURM_CONF=$CONF

    # --- munged (as root, hence --force: the key is owned by munge) ---
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$MUNGE_PIDFILE"
    munged --force --socket="$MUNGE_SOCK" --pid-file="$MUNGE_PIDFILE" \
        --log-file="$LOGDIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        --key-file="$MUNGE_KEY" </dev/null >>"$LOGDIR/munged.log" 2>&1 ||
        start_failed "munged exited with status $?"
    wait_pidfile "$MUNGE_PIDFILE" munged 10 || start_failed "munged did not start"
    local i ok=0
    for ((i = 0; i < 50; i++)); do
        if munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    ((ok)) || start_failed "munge encode/decode round trip via $MUNGE_SOCK failed"
    log "munged pid $(read_pid "$MUNGE_PIDFILE")"

    # --- slurmctld (daemonizes; -c: start with a clean job state) ---
    rm -f "$CTLD_PIDFILE" "$SLURMD_PIDFILE"
    slurmctld -c -f "$CONF" </dev/null >>"$LOGDIR/slurmctld.stdout" 2>&1 ||
        start_failed "slurmctld exited with status $?"
    wait_pidfile "$CTLD_PIDFILE" slurmctld 15 || start_failed "slurmctld did not start"
    ok=0
    for ((i = 0; i < 150; i++)); do
        if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
        alive "$(read_pid "$CTLD_PIDFILE")" slurmctld || start_failed "slurmctld died"
        sleep 0.2
    done
    ((ok)) || start_failed "slurmctld not answering 'scontrol ping'"
    log "slurmctld pid $(read_pid "$CTLD_PIDFILE")"

    # --- slurmd ---
    slurmd -f "$CONF" -N "$NODE" </dev/null >>"$LOGDIR/slurmd.stdout" 2>&1 ||
        start_failed "slurmd exited with status $?"
    wait_pidfile "$SLURMD_PIDFILE" slurmd 15 || start_failed "slurmd did not start"
    log "slurmd pid $(read_pid "$SLURMD_PIDFILE")"

    # --- wait for the node to be idle ---
    local limit=${SLURM_TEST_START_TIMEOUT:-60} state=""
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        state=$(timeout 5 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)
        [[ $state == idle ]] && break
        all_alive || start_failed "a daemon died while waiting for node $NODE to become idle"
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        timeout 5 scontrol show node "$NODE" >&2 || true
        start_failed "node $NODE not idle after ${limit}s (state: '${state:-?}')"
    fi
    log "cluster up in $((SECONDS - t0))s: node $NODE idle, $(nproc) CPUs"
    echo "export SLURM_CONF=$CONF"
}

# ------------------------------------------------------------------ stop ----

# Leftover processes of this cluster: slurmstepd and job processes (batch
# scripts, srun, tasks, and orphans that escaped proctrack/linuxproc), i.e.
# processes whose environment has SLURM_CONF=<our conf> and that are either
# slurmstepd or carry SLURM_JOB_ID. Normally none are left after scancel;
# this matters after a daemon crash (slurmstepd outlives slurmd) or when a job
# leaves orphans (reparented to PID 1, invisible to proctrack/linuxproc).
cluster_procs() {
    local d pid env ancestors=" " p=$$
    while [[ $p =~ ^[0-9]+$ && $p != 0 && $p != 1 ]]; do
        ancestors+="$p "
        p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 0)
    done
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ $ancestors == *" $pid "* || $pid == "$BASHPID" ]] && continue
        env=$({ tr '\0' '\n' <"$d/environ"; } 2>/dev/null) || continue
        grep -qxF "SLURM_CONF=$CONF" <<<"$env" || continue
        if [[ $(cat "$d/comm" 2>/dev/null) == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            echo "$pid"
        fi
    done
}

kill_leftovers() {
    local pids p i
    pids=$(cluster_procs)
    [[ -n $pids ]] || return 0
    log "killing leftover slurmstepd/job processes: $(echo $pids)"
    kill -KILL $pids 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [[ -z $(cluster_procs) ]] && return 0
        sleep 0.1
    done
    log "WARNING: processes still alive: $(echo $(cluster_procs))"
}

do_stop() {
    local ctld_pid slurmd_pid munged_pid i
    ctld_pid=$(read_pid "$CTLD_PIDFILE")
    slurmd_pid=$(read_pid "$SLURMD_PIDFILE")
    munged_pid=$(read_pid "$MUNGE_PIDFILE")
    export SLURM_CONF=$CONF

    # Cancel all jobs so that slurmstepd/job processes go away cleanly.
    if [[ -f $CONF ]] && alive "$ctld_pid" slurmctld && alive "$slurmd_pid" slurmd; then
        local jobs
        jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            timeout 10 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do
                [[ -z $(timeout 5 squeue -h -o '%i' 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi

    [[ -n $slurmd_pid ]] && kill_pid "$slurmd_pid" slurmd
    [[ -n $ctld_pid ]] && kill_pid "$ctld_pid" slurmctld
    kill_leftovers
    [[ -n $munged_pid ]] && kill_pid "$munged_pid" munged
    rm -f "$CTLD_PIDFILE" "$SLURMD_PIDFILE" "$MUNGE_PIDFILE"
    log "stopped cluster in $STATE_DIR"
}

do_status() {
    local rc=0 n f
    for n in munged slurmctld slurmd; do
        case $n in munged) f=$MUNGE_PIDFILE ;; slurmctld) f=$CTLD_PIDFILE ;; slurmd) f=$SLURMD_PIDFILE ;; esac
        if alive "$(read_pid "$f")" "$n"; then echo "$n: running (pid $(read_pid "$f"))"; else echo "$n: not running"; rc=1; fi
    done
    return $rc
}

# ------------------------------------------------------------------ main ----

cmd=${1:-}
case $cmd in
    start) set_paths "${2:-}"; do_start ;;
    stop) set_paths "${2:-}"; do_stop ;;
    status) set_paths "${2:-}"; do_status ;;
    *) usage ;;
esac
