#!/usr/bin/env bash
# Every GPU measurement of issue 26 (basis updates every k batches) in one call of under 10 minutes, for a session
# that is lent a GPU machine. It needs only torch on the machine (dlrt-bench does not import Hydra) and runs from a
# plain checkout, without installing it:
#
#   bash scripts/gpu_checks.sh "$OUT"                                      # on the GPU machine
#   PYTHON=.venv/bin/python bash scripts/gpu_checks.sh /tmp/try --quick    # here, on the CPU, to try it
#
# Into the folder given it writes gpu_bench.tar.gz and a log:
#   steps.*      LeNet5, the FC net and ResNet-50 at ImageNet shapes (batch 32): dense, adaptive at k = 1 and k = 10
#   timing_study.*  the paper's timing study (784-5120x4-10, batch 500) at k = 1 and 10, up to rank 1280
#   graphed/     the same steps and timing study replayed from CUDA graphs (a process of its own: a capture that
#                fails can leave the GPU unusable for the rest of its process)
#   memory.*     the peak memory of a basis step (adaptive) and of a coefficient step (adaptive_k10) beside dense
# Unpack the archive into results/bench/gpu/ and say there which card made the numbers. Each call has a time limit
# (STEPS_SECONDS, TIMING_SECONDS, GRAPHS_SECONDS, MEMORY_SECONDS), and the archive is made whatever happens.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [--quick]}
shift
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
device=cuda
imagenet=32
if [[ "${1:-}" == "--quick" ]]; then device=cpu; imagenet=0; fi  # ResNet-50 on a CPU: minutes, not a quick try
# An adaptive step at rank 1280 took 1.05 s on an H100 (its SVDs of 2r x 2r cores): 1280 is where the study stops.
ranks=${RANKS:-20,80,320,640,1280}
bench=("$PYTHON" -m dlrt.bench --device "$device" --basis-every 1,10)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  timeout "${STEPS_SECONDS:-150}" "${bench[@]}" --suite steps --graphs without --imagenet-batch "$imagenet" \
    --max-seconds 4 --out "$work" "$@" || echo "steps: exit status $?"
  timeout "${TIMING_SECONDS:-150}" "${bench[@]}" --suite timing_study --graphs without --ranks "$ranks" \
    --ts-max-seconds 3 --out "$work" "$@" || echo "timing study: exit status $?"
  if [[ "$device" == cuda ]]; then
    timeout "${GRAPHS_SECONDS:-180}" "${bench[@]}" --suite steps,timing_study --graphs only --ranks "$ranks" \
      --max-seconds 4 --ts-max-seconds 3 --out "$work/graphed" "$@" || echo "graphed steps: exit status $?"
  fi
  timeout "${MEMORY_SECONDS:-80}" "${bench[@]}" --suite memory --out "$work" "$@" || echo "memory: exit status $?"
} 2>&1 | tee "$out/gpu_checks.log"
tar -czf "$out/gpu_bench.tar.gz" -C "$work" .
