#!/usr/bin/env bash
# Stop the single-node SLURM that scripts/slurm_up.sh started: cancel its jobs, then stop slurmd,
# slurmctld and munged by the PIDs in their pid files (checked against /proc/PID/comm, since pid
# files can outlive their process and the PID be reused). Idempotent: nothing running is fine.
#
# Usage: bash scripts/slurm_down.sh [--keep-jobs]
#   --keep-jobs  do not scancel queued/running jobs first (slurmctld keeps them in its state save).
set -uo pipefail
log() { echo "slurm_down: $*" >&2; }

pid_of() {  # pid_of PIDFILE COMM -> prints the pid when it is a live process of that command
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n -E bash "$0" "$@"
fi

if [ "${1:-}" != "--keep-jobs" ] && pid_of /run/slurmctld.pid slurmctld >/dev/null; then
    # Jobs left running would leave orphan slurmstepd/task processes behind once slurmd is gone.
    if [ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]; then
        log "cancelling queued/running jobs"
        timeout 5 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 40); do
            [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
fi

stopped=()
for spec in /run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld /run/munge/munged.pid:munged; do
    file="${spec%%:*}"
    comm="${spec##*:}"
    pid="$(pid_of "$file" "$comm")" || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
        log "$comm ($pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    stopped+=("$comm($pid)")
done
if [ "${#stopped[@]}" -eq 0 ]; then
    log "nothing running"
else
    log "stopped ${stopped[*]}"
fi
exit 0
