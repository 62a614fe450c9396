#!/usr/bin/env bash
# Every GPU measurement that issue #5 asks for, in one call, for a session that is lent a GPU machine for
# about 15 minutes (see README "Speed"). It needs only torch on the machine (dlrt-bench does not import
# Hydra) and runs from a plain checkout, without installing it:
#
#   bash scripts/gpu_checks.sh "$OUT"                                      # on the GPU machine
#   PYTHON=.venv/bin/python bash scripts/gpu_checks.sh /tmp/try --quick    # here, on the CPU, to try it
#
# Into the folder given it writes gpu_bench.tar.gz (dlrt-bench's steps, breakdown, linalg and timing-study
# CSV/TXT/PNG files), the four .txt tables and a log: 6 files, within what the device tool brings back.
# Unpack the archive into results/bench/gpu/ and say there which card made the numbers.
set -euo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [--quick]}
shift
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
device=cuda
if [[ "${1:-}" == "--quick" ]]; then device=cpu; fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -m dlrt.bench --device "$device" --suite steps,breakdown,linalg --out "$work" "$@"
  # the paper's timing study, up to rank 2560 on a GPU, each runner capped at 10 s a phase
  "$PYTHON" -m dlrt.bench --device "$device" --suite timing_study --ts-max-seconds 10 --out "$work" "$@"
} 2>&1 | tee "$out/gpu_checks.log"
tar -czf "$out/gpu_bench.tar.gz" -C "$work" .
cp "$work"/*.txt "$out"/
