#!/usr/bin/env bash
# Run the commands of a file (one per line, e.g. the `dlrt-run ...` calls that `dlrt-tables --missing` lists, as
# `make reproduce-tables` does), JOBS at a time. Several small runs share one GPU well: a LeNet5 or FC step leaves
# most of the GPU idle while Python launches the next kernel.
#
#   dlrt-tables --runs results/runs --missing > missing.txt
#   bash scripts/parallel_runs.sh missing.txt [JOBS] [SECONDS]
#
# SECONDS (optional) is a deadline from now: no command starts after it, and those still running are
# stopped at it. dlrt-run checkpoints every epoch and skips finished runs, so calling this again with the
# same file resumes what was stopped and starts what never ran. Each command's output goes to
# LOG_DIR (default: logs/parallel_runs)/<line number>.log; a line per start and end goes to stdout.
#
# Why not Hydra's joblib launcher (`dlrt-run -m hydra/launcher=joblib`)? It runs one sweep of one command line, with
# no deadline (a sweep stopped from outside loses its job list, and joblib gives no way to stop at a time and say
# what did not start), no log per job, and it is an extra dependency. The missing runs are many unrelated commands
# (other experiments, models, widths), and a lent machine's time ends at a known second: this script starts none
# after it, stops what runs then, and the same call resumes.
set -uo pipefail
file=${1:?usage: parallel_runs.sh COMMANDS_FILE [JOBS] [SECONDS]}
jobs=${2:-4}
seconds=${3:-}
log_dir=${LOG_DIR:-logs/parallel_runs}
mkdir -p "$log_dir"
[[ -n "$seconds" ]] && deadline=$(( $(date +%s) + seconds )) || deadline=
export deadline log_dir

run_line() {  # $1: line number, $2: the command
  local left=
  if [[ -n "$deadline" ]]; then
    left=$(( deadline - $(date +%s) ))
    if (( left <= 0 )); then echo "$(date +%T) SKIP  #$1 (deadline): $2"; return 0; fi
  fi
  echo "$(date +%T) START #$1: $2"
  if [[ -n "$left" ]]; then timeout "$left" bash -c "$2"; else bash -c "$2"; fi >"$log_dir/$1.log" 2>&1
  local rc=$?
  echo "$(date +%T) END   #$1 rc=$rc$( ((rc == 124)) && echo ' (stopped at the deadline)')"
}
export -f run_line

grep -n -v -e '^\s*$' -e '^\s*#' "$file" | tr '\n' '\0' |
  xargs -0 -P "$jobs" -n 1 bash -c 'run_line "${1%%:*}" "${1#*:}"' _
