#!/usr/bin/env bash
# Stop the daemons scripts/slurm_up.sh started, by their pid files (never by name: other daemons may run).
set -u
stop() {
    [ -s "$1" ] || return 0
    local pid; pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    echo "slurm_down: pid $pid ($1) still alive after 20 s"
    return 1
}
stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
