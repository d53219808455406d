#!/usr/bin/env bash
# Start a real single-node SLURM (Debian slurm-wlm + munge) on this machine, for tests, CI and the demo.
#
# Idempotent: when the cluster already answers (node idle/mixed/allocated) it returns in about a second.
# Otherwise it installs the packages if missing (apt-get), writes /etc/slurm/slurm.conf (CPUs = nproc),
# starts munged, slurmctld and slurmd by hand (no systemd on CI machines), resumes a down/drained node,
# and runs a warm-up batch job so the first real job is scheduled without the initial ~3 s delay.
# Daemons are restarted whenever packages were installed or slurm.conf changed.
# Needs root (or passwordless sudo). Stop with scripts/slurm_down.sh (by PID).
#
# Usage: bash scripts/slurm_up.sh [--status]
#   --status   exit 0 when the cluster answers, 1 otherwise; changes nothing.
# Environment:
#   SLURM_UP_CPUS     CPUs of the node (default: nproc)
#   SLURM_UP_TIMEOUT  seconds to wait for the node to become usable (default 60)
#   SLURM_UP_FORCE    1 = replace an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

conf=/etc/slurm/slurm.conf
lock=/run/lock/dist-decode-slurm-up.lock
timeout="${SLURM_UP_TIMEOUT:-60}"
log() { echo "slurm_up: $*" >&2; }

cluster_ready() {  # the controller answers and the node can take jobs
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state="$(timeout 5 sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1)" || return 1
    case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

if [ "${1:-}" = "--status" ]; then
    cluster_ready
    exit $?
fi
if cluster_ready; then
    if [ -f "$conf" ] && grep -q "^# written by dist-decode scripts/slurm_up.sh" "$conf"; then
        log "already up ($(sinfo -h -o '%P %a %D %T' | head -n1))"
    else  # somebody else's cluster: use it, never reconfigure it
        log "a SLURM not configured by this script answers; leaving it alone ($(sinfo -h -o '%P %a %D %T' | head -n1))"
    fi
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "$0" "$@"
    fi
    log "error: needs root (or passwordless sudo) to install and start SLURM" >&2
    exit 1
fi

mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock -w 300 9 || { log "error: another slurm_up.sh holds $lock"; exit 1; }

alive() {  # alive PIDFILE COMM: the pid file names a live process of that command (pid files go stale)
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

if [ -f "$conf" ] && ! grep -q "^# written by dist-decode scripts/slurm_up.sh" "$conf" && [ "${SLURM_UP_FORCE:-0}" != 1 ]; then
    log "error: $conf was not written by this script; refusing to replace it (SLURM_UP_FORCE=1 overrides)"
    exit 1
fi
restart=0
# -- packages ---------------------------------------------------------------------------------
need=()
for pkg in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    restart=1
fi
[ -s /etc/munge/munge.key ] || { log "error: /etc/munge/munge.key missing after install"; exit 1; }

# -- configuration ----------------------------------------------------------------------------
# nproc honours OMP_NUM_THREADS (set to 1 by the test runner): ask for the real cores
cpus="${SLURM_UP_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
install -d -m 0755 /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
new_conf="$(mktemp)"
# Container-safe plugins (no cgroups, no accounting); hostname-independent via 'localhost'; see
# docs/launch.md and the single-node SLURM reference for why each line is there.
cat >"$new_conf" <<EOF
# written by dist-decode scripts/slurm_up.sh: a single-node cluster for tests, CI and the demo
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$conf"; then
    install -m 0644 "$new_conf" "$conf"
    restart=1
    log "wrote $conf (CPUs=$cpus)"
fi
rm -f "$new_conf"

# -- daemons ----------------------------------------------------------------------------------
stop_daemon() {  # stop_daemon PIDFILE COMM
    if alive "$1" "$2"; then
        local pid
        pid="$(cat "$1")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    fi
}
if [ "$restart" = 1 ]; then
    stop_daemon /run/slurmd.pid slurmd
    stop_daemon /run/slurmctld.pid slurmctld
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid munged; then
    runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null || { log "error: munge credential round trip failed"; exit 1; }
alive /run/slurmctld.pid slurmctld || /usr/sbin/slurmctld
alive /run/slurmd.pid slurmd || /usr/sbin/slurmd -N localhost

deadline=$((SECONDS + timeout))
until cluster_ready; do
    state="$(timeout 5 sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        down* | drain* | drained*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "error: node not usable after ${timeout}s (state: '${state:-no answer}'); see /var/log/slurm/"
        exit 1
    fi
    sleep 0.25
done

# -- warm-up: the first scheduler pass after slurmctld starts takes ~3 s ------------------------
jid="$(sbatch --parsable -o /dev/null -e /dev/null -J slurm_up_warmup --wrap true)"
for _ in $(seq 240); do
    [ -z "$(squeue -h -j "$jid" 2>/dev/null)" ] && break
    sleep 0.25
done
log "up: $(sinfo -h -o '%P %a %D %T' | head -n1) (CPUs=$cpus)"
