#!/bin/bash
# Every run of README.md, one after another on one thread (about 35 CPU minutes), then the figures and summary.csv.
# The library is imported from a snapshot of the commit README.md names (DLRT_SNAPSHOT, made with
#   git archive <commit> dlrt | tar -x -C $DLRT_SNAPSHOT), so that edits of the working tree during the runs do not
# reach them; leave DLRT_SNAPSHOT unset to use the checkout's dlrt.
set -e
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../../.venv/bin/python}
run() { PYTHONPATH=${DLRT_SNAPSHOT:-} "$python" "$here/diagnose.py" --out "$here" "$@" > "$here/logs/$(echo "$@" | tr ' ' '_' | tr -d '-').log" 2>&1; }
mkdir -p "$here/logs"
# round 1: where the truncations fall and what they drop (2 epochs, probes around every truncation)
run --variant library --tau 0.4 --k 1 --epochs 2
run --variant library --tau 0.4 --k 5 --epochs 2
run --variant cut_at_once --tau 0.4 --k 5 --epochs 2
run --variant inner_tau --tau 0.4 --inner-tau 0.15 --k 5 --epochs 2
run --variant library --tau 0.15 --k 5 --epochs 1
# round 2: a last epoch at k = 1, and a cycle kept at rank >= 8 (3 epochs, full test set at the epochs' ends)
run --variant library --tau 0.4 --k 1 --epochs 3 --light --name light_library_tau0.4_k1_3ep
run --variant library --tau 0.4 --k 5 --epochs 3 --final-k1-epochs 1 --light --name light_library_tau0.4_k5_3ep_final1k1
run --variant inner_tau --tau 0.4 --inner-tau 0.4 --inner-r-min 8 --k 5 --epochs 3 --final-k1-epochs 1 --light \
    --name light_inner_rmin8_tau0.4_k5_3ep_final1k1
# round 3: the new directions from the cycle's mean gradient
run --variant avg_dirs --tau 0.4 --k 5 --epochs 2
"$python" "$here/diagnose.py" --plot "$here"
