#!/usr/bin/env bash
# Start a one-node Slurm on this machine for sparserl's cluster tests: munge, MariaDB + slurmdbd (submitit
# reads job states through sacct), slurmctld and slurmd, each started directly (no systemd), on localhost.
# Needs root and the packages `make install` installs. Idempotent: daemons already up are left alone.
# Stop with scripts/slurm_down.sh. State (configs, spool, logs) lives under $SLURM_ROOT.
set -euo pipefail
SLURM_ROOT=${SLURM_ROOT:-/var/lib/sparserl-slurm}
LOGS=$SLURM_ROOT/log
[ "$(id -u)" = 0 ] || { echo "slurm_up: needs root (it starts system daemons)"; exit 1; }
for bin in munged slurmctld slurmd slurmdbd mariadbd sbatch; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || { echo "slurm_up: $bin is missing; run make install"; exit 1; }
done
mkdir -p "$LOGS" "$SLURM_ROOT/spool/ctld" "$SLURM_ROOT/spool/d" /etc/slurm

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS COMMAND...: poll every 0.2 s
    local tries=$(( $1 * 5 )); shift
    for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}
# start_daemon NAME COMMAND...: in the background, detached from the caller's stdin/stdout/stderr. A plain
# `alive pidfile || cmd &` would background the whole list in a subshell that keeps the caller's pipes open
# until the daemon exits, so a caller reading our output (CI, the test fixture) waits forever.
start_daemon() {
    local name=$1; shift
    nohup "$@" </dev/null >"$LOGS/$name.out" 2>&1 &
}

# munge: the authentication every Slurm daemon and client uses
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged </dev/null >"$LOGS/munged.out" 2>&1
wait_for 10 bash -c 'munge -n </dev/null | unmunge' || { echo "slurm_up: munge does not answer"; exit 1; }

# accounting: MariaDB and slurmdbd
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
install -d -o mysql -g mysql /run/mysqld
mariadb-admin ping >/dev/null 2>&1 \
    || start_daemon mariadb /usr/sbin/mariadbd --user=mysql --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900
wait_for 30 mariadb-admin ping || { echo "slurm_up: MariaDB did not start (see $LOGS/mariadb.out)"; exit 1; }
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'sparserl';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=sparserl
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a readable one
alive /run/slurmdbd.pid || start_daemon slurmdbd slurmdbd -D
wait_for 30 bash -c '(exec 3<>/dev/tcp/127.0.0.1/6819)' || { echo "slurm_up: slurmdbd did not start"; exit 1; }

# the cluster: one node (this host, as slurmd -C sees it, with 3/4 of its memory) in one partition
host=$(hostname -s)
node=$(slurmd -C | head -1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
node=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( mem * 3 / 4 ))/" <<<"$node")
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=sparserl
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120, minimum 5); the scheduler
# looks at pending jobs every 1-2 s: a preempted job is back within ~10 s
AuthInfo=cred_expire=5
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MailProg=/bin/true
StateSaveLocation=$SLURM_ROOT/spool/ctld
SlurmdSpoolDir=$SLURM_ROOT/spool/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
alive /run/slurmctld.pid || start_daemon slurmctld slurmctld -D
wait_for 30 bash -c 'scontrol ping | grep -q UP' || { echo "slurm_up: slurmctld did not start"; tail -5 "$LOGS/slurmctld.log"; exit 1; }
alive /run/slurmd.pid || start_daemon slurmd slurmd -D
wait_for 30 bash -c '[ "$(sinfo -h -o %T)" = idle ] || [ "$(sinfo -h -o %T)" = mixed ] || [ "$(sinfo -h -o %T)" = allocated ]' \
    || { echo "slurm_up: the node is not up: $(sinfo -h -o '%T %E')"; tail -5 "$LOGS/slurmd.log"; exit 1; }
echo "slurm_up: one-node Slurm up ($host, $(sinfo -h -o '%c CPUs, %m MB'))"
