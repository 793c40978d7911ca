#!/usr/bin/env bash
# hpcvid: quick self-check of the local SLURM cluster started by slurm/local/up.sh.
#
#   1. sbatch --wrap hostname          runs, writes its output, sacct shows COMPLETED
#   2. srun --mpi=pmi2 -n 2 (mpi4py)    both ranks see a world of size 2
#   3. submitit job                    returns its value, sacct shows COMPLETED
#   --requeue  also: `scontrol requeue` of a running batch job makes it run again
#   --preempt  also: a --qos=high job preempts (requeues) a running normal job
#
# Usage:  PYTHON=/work/main/.venv/bin/python slurm/local/check.sh [--requeue] [--preempt]
#   PYTHON must have submitit, mpi4py and an MPI (PyPI `mpich`); default python3.
# Exit status 0 when every check passed.
set -uo pipefail

BASE=${HPCVID_SLURM_BASE:-/tmp/hpcvid-slurm}
PYTHON=${PYTHON:-python3}
DO_REQUEUE=0; DO_PREEMPT=0
for a in "$@"; do
  case $a in
    --requeue) DO_REQUEUE=1 ;;
    --preempt) DO_PREEMPT=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument: $a (try --help)" >&2; exit 2 ;;
  esac
done
[ -f "$BASE/env.sh" ] || { echo "check.sh: $BASE/env.sh not found: run slurm/local/up.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
. "$BASE/env.sh"
PART=${HPCVID_SLURM_PARTITION:-debug}
export OMP_NUM_THREADS=1
W=$BASE/check/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$W"
PYTHON=$(command -v "$PYTHON") || { echo "check.sh: python '$PYTHON' not found" >&2; exit 1; }

T0=$(date +%s%N)
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { local ms=$1; printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }
FAILS=0
pass() { printf 'check.sh: PASS %-28s %6ss  %s\n' "$1" "$(secs "$2")" "${3:-}"; }
fail() { printf 'check.sh: FAIL %-28s %s\n' "$1" "$2" >&2; FAILS=$((FAILS + 1)); }
# poll <seconds> <command...>: every 0.2 s until the command succeeds
poll() { local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done; }
gone() { [ -z "$(squeue -h -j "$1" 2>/dev/null)" ]; }
jstate() { squeue -h -j "$1" -o %T 2>/dev/null; }
sacct_is() { sacct -n -X -P -j "$1" -o State 2>/dev/null | head -1 | grep -q "^$2"; }

sinfo -h -o '%P %a %D %t' | grep -q . || { echo "check.sh: sinfo does not answer; is the cluster up?" >&2; exit 1; }
echo "check.sh: cluster $(scontrol show config | awk '/^ClusterName/{print $3}'), node $(sinfo -h -o '%N %t %c CPUs'), python $PYTHON, work dir $W"

# ------------------------------------------------------------ 1. sbatch --wrap hostname
t=$(now_ms)
if JID=$(sbatch --parsable -p "$PART" -n 1 -t 5 -o "$W/hostname-%j.out" --wrap hostname 2>&1); then
  if poll 120 gone "$JID" && poll 60 sacct_is "$JID" COMPLETED; then
    if [ "$(cat "$W/hostname-$JID.out" 2>/dev/null)" = "$(hostname)" ] || [ "$(cat "$W/hostname-$JID.out" 2>/dev/null)" = "$(hostname -s)" ]; then
      pass "sbatch --wrap hostname" $(( $(now_ms) - t )) "job $JID COMPLETED, printed $(cat "$W/hostname-$JID.out")"
    else fail "sbatch --wrap hostname" "job $JID output: '$(cat "$W/hostname-$JID.out" 2>&1)'"; fi
  else fail "sbatch --wrap hostname" "job $JID: squeue '$(jstate "$JID")', sacct '$(sacct -n -X -P -j "$JID" -o State)'"; fi
else fail "sbatch --wrap hostname" "sbatch: $JID"; fi

# ------------------------------------------------------------ 2. srun --mpi=pmi2 with mpi4py
t=$(now_ms)
OUT=$(timeout 180 srun -p "$PART" --mpi=pmi2 -n 2 -t 5 "$PYTHON" -c \
  'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size, c.allreduce(c.rank + 1), flush=True)' 2>&1)
RC=$?
if [ "$RC" = 0 ] && [ "$(echo "$OUT" | sort)" = "$(printf '0 2 3\n1 2 3')" ]; then
  pass "srun --mpi=pmi2 -n 2 mpi4py" $(( $(now_ms) - t )) "ranks: $(echo "$OUT" | sort | cut -d' ' -f1,2 | tr '\n' ';')"
else
  fail "srun --mpi=pmi2 -n 2 mpi4py" "rc=$RC, output: $OUT"
fi

# ------------------------------------------------------------ 3. submitit
t=$(now_ms)
OUT=$(timeout 300 "$PYTHON" - "$W/submitit" "$PART" <<'EOF' 2>&1
import sys, submitit
folder, partition = sys.argv[1], sys.argv[2]
ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
ex.update_parameters(slurm_partition=partition, timeout_min=5)
job = ex.submit(pow, 2, 10)
print("JOB", job.job_id, "RESULT", job.result(), "STATE", job.state)
EOF
)
RC=$?
JID=$(echo "$OUT" | awk '/^JOB /{print $2}')
if [ "$RC" = 0 ] && echo "$OUT" | grep -q "RESULT 1024 " && poll 60 sacct_is "$JID" COMPLETED; then
  pass "submitit pow(2, 10)" $(( $(now_ms) - t )) "job $JID returned 1024, sacct COMPLETED"
else
  fail "submitit pow(2, 10)" "rc=$RC, output: $(echo "$OUT" | tail -5)"
fi

# ------------------------------------------------------------ 4. scontrol requeue (optional)
if [ "$DO_REQUEUE" = 1 ]; then
  t=$(now_ms)
  # shellcheck disable=SC2016  # expanded by the job, not here
  JID=$(sbatch --parsable -p "$PART" -n 1 -t 5 --requeue -o "$W/requeue-%j.out" --open-mode=append \
        --wrap 'echo "start restart=${SLURM_RESTART_COUNT:-0} $(date +%s.%N)"; sleep 300')
  if poll 60 sh -c "grep -q 'restart=0' '$W/requeue-$JID.out'"; then
    tq=$(now_ms)
    scontrol requeue "$JID"
    if poll 120 sh -c "grep -q 'restart=1' '$W/requeue-$JID.out'"; then
      pass "scontrol requeue" $(( $(now_ms) - t )) "job $JID ran again $(secs $(( $(now_ms) - tq )))s after the requeue"
    else fail "scontrol requeue" "job $JID did not restart within 120 s (state $(jstate "$JID"))"; fi
  else fail "scontrol requeue" "job $JID did not start (state $(jstate "$JID"))"; fi
  scancel "$JID" 2>/dev/null; poll 30 gone "$JID"
fi

# ------------------------------------------------------------ 5. QOS preemption (optional)
if [ "$DO_PREEMPT" = 1 ]; then
  t=$(now_ms)
  NCPU=$(sinfo -h -o %c | head -1)
  # shellcheck disable=SC2016
  LOW=$(sbatch --parsable -p "$PART" -n 1 -c "$NCPU" -t 10 --requeue --signal=B:USR2@90 -o "$W/low-%j.out" --open-mode=append \
        --wrap 'trap "echo got USR2" USR2; echo "low restart=${SLURM_RESTART_COUNT:-0}"; for i in $(seq 600); do sleep 0.5; done')
  if poll 60 sh -c "grep -q 'restart=0' '$W/low-$LOW.out'"; then
    tp=$(now_ms)
    HIGH=$(sbatch --parsable -p "$PART" -n 1 -c "$NCPU" -t 5 --qos=high -o "$W/high-%j.out" --wrap 'echo high ran')
    if poll 120 sacct_is "$HIGH" COMPLETED && poll 120 sh -c "grep -q 'restart=1' '$W/low-$LOW.out'"; then
      pass "QOS preemption (requeue)" $(( $(now_ms) - t )) "high job $HIGH ran; low job $LOW requeued and running again $(secs $(( $(now_ms) - tp )))s later; $(grep -c 'got USR2' "$W/low-$LOW.out") USR2 seen"
    else fail "QOS preemption (requeue)" "high $HIGH: $(sacct -n -X -P -j "$HIGH" -o State), low $LOW: $(jstate "$LOW"); $(tr '\n' ' ' < "$W/low-$LOW.out")"; fi
  else fail "QOS preemption (requeue)" "low job $LOW did not start (state $(jstate "$LOW"))"; fi
  scancel "$LOW" "${HIGH:-}" 2>/dev/null; poll 30 gone "$LOW"
fi

echo "check.sh: $([ "$FAILS" = 0 ] && echo "all checks passed" || echo "$FAILS check(s) FAILED") in $(secs $(( $(now_ms) - T0 / 1000000 ))) s"
[ "$FAILS" = 0 ]
