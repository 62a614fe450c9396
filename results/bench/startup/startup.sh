#!/bin/bash
# Start-up times of dlrt-run (issue 17): `--help`, and the first printed line and the epoch line of a 1-epoch
# synthetic run, for an old and a new source tree, alternating, 3 tries each. Output: startup.txt.
#   OLD_TREE=<checkout of 8164c64> OLD_PY=<its python> NEW_TREE=. NEW_PY=.venv/bin/python bash startup.sh
first_line() { # seconds until the first printed line, and until the epoch line
  local py=$1 dir=$2; rm -rf /tmp/su_runs
  local t0=$(date +%s.%N) first=""
  (cd /tmp && PYTHONPATH=$dir $py -m dlrt.cli data=synthetic epochs=1 progress=false threads=1 out_dir=/tmp/su_runs 2>&1) | while read -r l; do
    now=$(echo "$(date +%s.%N) - $t0" | bc)
    [ -z "$first" ] && first=$now
    case "$l" in "epoch "*) echo "first line $first s, epoch line $now s"; break;; esac; done
}
for try in 1 2 3; do
  for v in old new; do
    if [ $v = old ]; then py=$OLD_PY; dir=$OLD_TREE; else py=$NEW_PY; dir=$NEW_TREE; fi
    t0=$(date +%s.%N); (cd /tmp && PYTHONPATH=$dir $py -m dlrt.cli --help > /dev/null 2>&1); t1=$(date +%s.%N)
    echo "$v try $try: --help $(echo "$t1 - $t0" | bc) s; $(first_line $py $dir)"
  done
done
