#!/usr/bin/env bash
# hpcvid: stop the single-node SLURM cluster started by slurm/local/up.sh.
#
# Stops only the daemons whose pid files up.sh left under $HPCVID_SLURM_BASE/run, in reverse
# start order (slurmd, slurmctld, slurmdbd, mariadbd, munged), and waits for each to exit.
# A munged that up.sh found already running has no pid file there and is left alone.
# Packages stay installed.
#
# Usage:  sudo slurm/local/down.sh [--purge]
#   --purge   also delete $HPCVID_SLURM_BASE (configs, logs, state, accounting DB) and the
#             /etc/slurm copies that up.sh wrote (only if they still carry its marker line)
set -uo pipefail

BASE=${HPCVID_SLURM_BASE:-/tmp/hpcvid-slurm}
MARK="# written by hpcvid slurm/local/up.sh"
PURGE=0
for a in "$@"; do
  case $a in
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "down.sh: unknown argument: $a (try --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "down.sh: ERROR: must run as root" >&2; exit 1; }
export SLURM_CONF=$BASE/etc/slurm.conf
T0=$(date +%s%N)

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# The pid must still belong to the program we started (pid files can outlive a reboot).
is_ours() { # is_ours <pid> <program name>
  alive "$1" && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q "$2"
}

# 1. cancel remaining jobs so that no job step outlives slurmd
if is_ours "$(cat "$BASE/run/slurmctld.pid" 2>/dev/null)" slurmctld; then
  JOBS=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${JOBS// }" ]; then
    echo "down.sh: cancelling jobs: $JOBS"
    # shellcheck disable=SC2086
    scancel $JOBS 2>/dev/null
    for _ in $(seq 100); do
      [ -z "$(squeue -h -t R,CG,PD -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. stop daemons in reverse start order
RC=0
stop() { # stop <name>
  local f=$BASE/run/$1.pid pid
  pid=$(cat "$f" 2>/dev/null) || return 0
  if is_ours "$pid" "$1"; then
    local t; t=$(date +%s%N)
    kill -TERM "$pid"
    for _ in $(seq 150); do alive "$pid" || break; sleep 0.2; done   # up to 30 s
    if alive "$pid"; then
      echo "down.sh: $1 (pid $pid) still running 30 s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid"; sleep 0.5
      alive "$pid" && { echo "down.sh: ERROR: could not stop $1 (pid $pid)" >&2; RC=1; return; }
    fi
    t=$(( ($(date +%s%N) - t) / 1000000 ))
    printf 'down.sh: stopped %s (pid %s) in %d.%01d s\n' "$1" "$pid" $((t / 1000)) $((t % 1000 / 100))
  else
    echo "down.sh: $1 (pid $pid) was not running"
  fi
  rm -f "$f"
}
for d in slurmd slurmctld slurmdbd mariadbd munged; do stop "$d"; done
rm -f "$BASE/run/mariadb.sock"

# 3. optional purge of our state
if [ "$PURGE" = 1 ] && [ "$RC" = 0 ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    [ -f "$f" ] && head -1 "$f" | grep -qxF "$MARK" && rm -f "$f"
  done
  case $BASE in /|"") echo "down.sh: refusing to delete BASE='$BASE'" >&2; exit 1 ;; esac
  rm -rf "$BASE"
  echo "down.sh: purged $BASE"
fi
ms=$(( ($(date +%s%N) - T0) / 1000000 ))
printf 'down.sh: done in %d.%01d s\n' $((ms / 1000)) $((ms % 1000 / 100))
exit "$RC"
