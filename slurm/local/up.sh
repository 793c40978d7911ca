#!/usr/bin/env bash
# hpcvid: bring up a real single-node SLURM cluster on this machine (Debian 12, run as root).
#
#   munged                 authentication (reused if one already answers on /run/munge)
#   mariadbd + slurmdbd    accounting, so that `sacct` works (submitit reads job state only via sacct)
#   slurmctld + slurmd     one node = this host, one partition `debug` (default)
#
# Everything this script writes, apart from Debian packages, /run/munge and (when free) two
# copies under /etc/slurm, lives under $HPCVID_SLURM_BASE (default /tmp/hpcvid-slurm):
#   etc/ configs   log/ daemon logs   run/ pid files   state/ slurmctld+slurmd state   db/ MariaDB
#   env.sh         `source` it before using sbatch/srun/sacct/submitit (sets SLURM_CONF)
# Stop with slurm/local/down.sh (only the daemons started here, by their pid files).
#
# Usage:  sudo slurm/local/up.sh [--fresh]
#   --fresh    wipe slurmctld state and the accounting DB first (job ids restart at 1)
# Environment knobs (defaults):
#   HPCVID_SLURM_BASE=/tmp/hpcvid-slurm   HPCVID_SLURM_CLUSTER=hpcvid   HPCVID_SLURM_PARTITION=debug
#   HPCVID_SLURM_CTLD_PORT=6817  HPCVID_SLURM_SLURMD_PORT=6818  HPCVID_SLURM_DBD_PORT=6819
#   HPCVID_SLURM_DB_PORT=13306 (MariaDB, bound to 127.0.0.1)
#   HPCVID_SLURM_MEM_MARGIN_MB=1024 (node RealMemory = MemTotal - max(margin, 5%))
#   HPCVID_SLURM_NO_APT=1 (never call apt; fail if a package is missing)
set -euo pipefail

BASE=${HPCVID_SLURM_BASE:-/tmp/hpcvid-slurm}
CLUSTER=${HPCVID_SLURM_CLUSTER:-hpcvid}
PARTITION=${HPCVID_SLURM_PARTITION:-debug}
CTLD_PORT=${HPCVID_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${HPCVID_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${HPCVID_SLURM_DBD_PORT:-6819}
DB_PORT=${HPCVID_SLURM_DB_PORT:-13306}
MEM_MARGIN_MB=${HPCVID_SLURM_MEM_MARGIN_MB:-1024}
NO_APT=${HPCVID_SLURM_NO_APT:-0}
FRESH=0
for a in "$@"; do
  case $a in
    --fresh) FRESH=1 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "up.sh: unknown argument: $a (try --help)" >&2; exit 2 ;;
  esac
done
# Debian 12 packages. slurm-wlm-basic-plugins (a dependency of slurmd/slurmctld) carries
# mpi/pmi2, which is all `srun --mpi=pmi2` needs for PyPI MPICH ranks (MPICH brings its own
# PMI-2 client); no libpmi2/libpmix package is needed for that.
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
MARK="# written by hpcvid slurm/local/up.sh"
export DEBIAN_FRONTEND=noninteractive
export SLURM_CONF=$BASE/etc/slurm.conf      # all slurm daemons and clients below use this

T0=$(date +%s%N)
el() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }
step() { printf '[up.sh %6ss] %s\n' "$(el)" "$*"; }
LOGHINT=0
die() { echo "up.sh: ERROR: $*" >&2; [ "$LOGHINT" = 1 ] && echo "up.sh: logs are in $BASE/log" >&2; exit 1; }
waitfor() { # waitfor <seconds> <what> <command...>: poll every 0.2 s until the command succeeds
  local secs=$1 what=$2; local end=$(( $(date +%s) + secs )); shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${secs} s waiting for $what"
    sleep 0.2
  done
}
# pid_alive <pidfile>: the pid in it runs the daemon the file is named after (not a reused pid)
pid_alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
  && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "$(basename "$1" .pid)"; }
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# ------------------------------------------------------------------ 0. preconditions
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons): sudo $0"
command -v ss >/dev/null || die "'ss' (iproute2) not found"
mkdir -p "$BASE"/{etc,log,run,state/ctld,state/d}
LOGHINT=1
# Already up (all of our daemons alive and answering)? Then there is nothing to do.
if [ "$FRESH" = 0 ] && [ -f "$BASE/env.sh" ] && pid_alive "$BASE/run/slurmctld.pid" && pid_alive "$BASE/run/slurmd.pid" \
   && pid_alive "$BASE/run/slurmdbd.pid" && pid_alive "$BASE/run/mariadbd.pid" \
   && sinfo -h -o %t 2>/dev/null | grep -qx 'idle\|mix\|alloc' && sacct -n -X -S now-1minute >/dev/null 2>&1; then
  step "already up (pids in $BASE/run); nothing to do"
  exit 0
fi
for p in "$BASE"/run/*.pid; do
  [ -e "$p" ] || continue
  if pid_alive "$p"; then die "$(basename "$p" .pid) from a previous up.sh is still running (pid $(cat "$p"))$([ "$FRESH" = 0 ] && echo " but the cluster is not healthy"); run slurm/local/down.sh first"; fi
  rm -f "$p"
done

# ------------------------------------------------------------------ 1. packages
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$NO_APT" = 1 ] && die "packages missing:$missing (and HPCVID_SLURM_NO_APT=1)"
  command -v apt-get >/dev/null || die "packages missing:$missing and apt-get not found (this script targets Debian 12)"
  step "installing:$missing (log: $BASE/log/apt.log)"
  # Debian's postinst scripts would start munge/mariadb/slurm through invoke-rc.d; forbid that so
  # that the only daemons running are the ones started (and later stopped) by us.
  MADE_POLICY=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; MADE_POLICY=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
  apt-get "${APT_OPTS[@]}" update -qq >"$BASE/log/apt.log" 2>&1 || { tail -20 "$BASE/log/apt.log" >&2; die "apt-get update failed"; }
  # shellcheck disable=SC2086
  apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends $missing >>"$BASE/log/apt.log" 2>&1 \
    || { tail -30 "$BASE/log/apt.log" >&2; die "apt-get install failed"; }
  [ "$MADE_POLICY" = 1 ] && { rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
fi
SLURM_VERSION=$(slurmctld -V | awk '{print $2}')
[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_pmi2.so ] || [ -n "$(find /usr/lib -name mpi_pmi2.so 2>/dev/null | head -1)" ] \
  || die "slurm mpi/pmi2 plugin (mpi_pmi2.so) not found; is slurm-wlm-basic-plugins installed?"
step "packages ok: slurm $SLURM_VERSION, munge $(dpkg-query -W -f='${Version}' munge), $(mariadbd --version | awk '{print $3}')"

# ------------------------------------------------------------------ 2. host + ports
H=$(hostname -s)
getent hosts "$H" >/dev/null || die "hostname '$H' does not resolve; add '127.0.0.1 $H' to /etc/hosts"
for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
  port_busy "$port" && die "TCP port $port is already in use (another SLURM/MariaDB?); set HPCVID_SLURM_*_PORT"
done

# ------------------------------------------------------------------ 3. munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  step "munged already answers on /run/munge: reusing it (down.sh will leave it alone)"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  # a stale socket from a killed munged makes the new one refuse to start
  [ -S /run/munge/munge.socket.2 ] && rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  step "starting munged"
  runuser -u munge -- /usr/sbin/munged
  waitfor 15 munged sh -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$BASE/run/munged.pid"
fi

# ------------------------------------------------------------------ 4. configs
NCPU=$(nproc)
MEM_TOTAL=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)
MARGIN=$(( MEM_TOTAL / 20 > MEM_MARGIN_MB ? MEM_TOTAL / 20 : MEM_MARGIN_MB ))
MEM=$(( MEM_TOTAL - MARGIN ))
# topology as slurmd itself detects it: CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=..
HW=$(SLURM_CONF=/dev/null slurmd -C 2>/dev/null | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=.*//')
case $HW in CPUs=*) ;; *) die "could not read the node topology from 'slurmd -C'";; esac

cat > "$BASE/etc/slurm.conf" <<EOF
$MARK
# single-node cluster on $H; state under $BASE
ClusterName=$CLUSTER
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# a requeued job may start again only cred_expire+1 s after it ended (default 120 s)
AuthInfo=cred_expire=20
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd/cgroup v2 delegation here: track processes through their parent pids
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# every CPU is schedulable on its own; memory is not a consumable resource
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# small jobs start at once: the main loop runs on every submit (no defer) and every 2 s;
SchedulerParameters=sched_interval=2,sched_min_interval=100000,batch_sched_delay=0,bf_interval=2
# a job whose dependency can never be met (afterok on a failed job) is cancelled, not left pending
DependencyParameters=kill_invalid_depend
# srun --mpi=pmi2 starts PyPI MPICH ranks; plain srun starts plain tasks
MpiDefault=none
# batch jobs may be requeued (scontrol requeue, submitit checkpointing, preemption)
JobRequeue=1
PreemptType=preempt/qos
PreemptMode=REQUEUE
# preempted jobs receive their --signal (submitit: USR2) at once, not only near the time limit
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MaxJobCount=100000
# a job that can never fit (e.g. -n 3 on 2 CPUs) is refused by sbatch instead of pending forever
EnforcePartLimits=ALL
MaxArraySize=10001
MinJobAge=60
KillWait=5
InactiveLimit=0
Waittime=0
MessageTimeout=10
ReturnToService=2
MailProg=/bin/true
NodeName=$H NodeAddr=127.0.0.1 $HW RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF

cat > "$BASE/etc/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=hpcvid-slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$BASE/etc/slurmdbd.conf"

# Clients that do not source env.sh look in /etc/slurm: install copies there unless that
# directory holds someone else's configuration.
ETC_NOTE="SLURM_CONF must point at $SLURM_CONF (source $BASE/env.sh)"
if [ ! -e /etc/slurm/slurm.conf ] || head -1 /etc/slurm/slurm.conf | grep -qxF "$MARK"; then
  install -d /etc/slurm
  install -m 644 "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf
  install -m 600 "$BASE/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  ETC_NOTE="copies installed in /etc/slurm (plain clients work without env.sh)"
fi

cat > "$BASE/env.sh" <<EOF
$MARK
# source this file before sbatch/srun/squeue/sacct or submitit
export SLURM_CONF=$BASE/etc/slurm.conf
export HPCVID_SLURM_BASE=$BASE
export HPCVID_SLURM_PARTITION=$PARTITION
EOF

# ------------------------------------------------------------------ 5. accounting: MariaDB + slurmdbd
if [ "$FRESH" = 1 ]; then
  step "--fresh: wiping $BASE/db and $BASE/state"
  rm -rf "$BASE/db" "$BASE/state"; mkdir -p "$BASE"/state/{ctld,d}
fi
if [ ! -d "$BASE/db/data/mysql" ]; then
  step "initialising MariaDB data dir $BASE/db/data"
  rm -rf "$BASE/db"; mkdir -p "$BASE/db"
  mariadb-install-db --no-defaults --user=root --datadir="$BASE/db/data" --skip-test-db \
    --auth-root-authentication-method=socket >"$BASE/log/mariadb-install.log" 2>&1 \
    || { tail -20 "$BASE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
fi
step "starting mariadbd on 127.0.0.1:$DB_PORT"
nohup /usr/sbin/mariadbd --no-defaults --user=root --datadir="$BASE/db/data" \
  --socket="$BASE/run/mariadb.sock" --pid-file="$BASE/run/mariadbd.pid" \
  --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$BASE/log/mariadb.err" \
  --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
  --innodb-lock-wait-timeout=900 --max-connections=100 </dev/null >/dev/null 2>&1 &
waitfor 60 "mariadbd (see $BASE/log/mariadb.err)" mariadb --no-defaults -S "$BASE/run/mariadb.sock" -e 'select 1'
mariadb --no-defaults -S "$BASE/run/mariadb.sock" <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'hpcvid-slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'hpcvid-slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

step "starting slurmdbd on port $DBD_PORT"
slurmdbd
waitfor 60 "slurmdbd (see $BASE/log/slurmdbd.log)" sacctmgr -n show cluster
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
# QOS for preemption tests: a job with --qos=high requeues running `normal` jobs
# (they get their --signal first, then SIGTERM, after GraceTime).
if ! sacctmgr -n -P show qos format=name | grep -qx high; then
  sacctmgr -i add qos high Priority=1000 Preempt=normal PreemptMode=requeue >/dev/null
  sacctmgr -i modify qos normal set GraceTime=10 >/dev/null
  sacctmgr -i modify user root set qos+=high >/dev/null
fi

# ------------------------------------------------------------------ 6. slurmctld + slurmd
step "starting slurmctld (port $CTLD_PORT) and slurmd (port $SLURMD_PORT)"
slurmctld
waitfor 30 "slurmctld (see $BASE/log/slurmctld.log)" sh -c 'scontrol ping | grep -q "is UP"'
slurmd
waitfor 60 "node $H to be idle (see $BASE/log/slurmd.log)" sh -c "sinfo -h -n $H -o %t | grep -qx idle"
waitfor 30 "sacct to answer" sacct -n -X -S now-1minute
sinfo
step "cluster '$CLUSTER' up: node $H CPUs=$NCPU RealMemory=${MEM}M, partition $PARTITION"
step "$ETC_NOTE"
echo "up.sh: logs in $BASE/log; stop with slurm/local/down.sh; took $(el) s"
