#!/usr/bin/env bash
# Every GPU measurement that issue #5 asks for, in one call, for a session that is lent a GPU machine for
# about 15 minutes (see README "Speed"). It needs only torch on the machine (dlrt-bench does not import
# Hydra) and runs from a plain checkout, without installing it:
#
#   bash scripts/gpu_checks.sh "$OUT"                                      # on the GPU machine
#   PYTHON=.venv/bin/python bash scripts/gpu_checks.sh /tmp/try --quick    # here, on the CPU, to try it
#
# Into the folder given it writes gpu_bench.tar.gz (dlrt-bench's steps, breakdown, linalg, memory and timing-study
# CSV/TXT/PNG files; throughput/ the input pipeline's and training's images per second; graphed/ the steps and
# timing study of CUDA-graphed steps against dense; capture/ what a CUDA graph can hold, from
# scripts/probe_graph_capture.py) and a log.
# Unpack the archive into results/bench/gpu/ and say there which card made the numbers. Each bench call has a
# time limit (BENCH_SECONDS, MEMORY_SECONDS, THROUGHPUT_SECONDS, TIMING_SECONDS, GRAPHS_SECONDS), and the archive is made whatever happens, so a
# slow timing study cannot lose the other suites.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [--quick]}
shift
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
device=cuda
if [[ "${1:-}" == "--quick" ]]; then device=cpu; fi
# The paper's ranks end at 2560. On an H100 an adaptive step took 1.05 s at rank 1280 and grows about as r^3
# (its SVDs of 2r x 2r cores), too long for a 15-minute lease; 1280 already shows where the crossover lies.
ranks=${RANKS:-5,10,20,40,80,160,320,640,1280}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  # which torch.linalg calls a CUDA graph can hold in this torch (each in a process of its own)
  timeout 90 "$PYTHON" scripts/probe_graph_capture.py --device "$device" --out "$work/capture" || echo "capture probe: exit status $?"
  timeout "${BENCH_SECONDS:-150}" "$PYTHON" -m dlrt.bench --device "$device" --suite steps,breakdown,linalg \
    --graphs without --out "$work" "$@" || echo "steps/breakdown/linalg: exit status $?"
  # peak memory of a training step, dense beside each method (issue 18): max_memory_allocated on a GPU
  timeout "${MEMORY_SECONDS:-150}" "$PYTHON" -m dlrt.bench --device "$device" --suite memory --out "$work" "$@" \
    || echo "memory: exit status $?"
  # images per second of the input pipeline and of training on a generated image folder (issue 19)
  if [[ "$device" == cuda ]]; then
    throughput=(--device cuda --processes 1 --precisions fp32,bf16 --model resnet50 --images 4096 --image-size 256
                --format jpg --batch-size 128 --loader-workers 8)
  else
    throughput=(--device cpu --model small_resnet --images 256 --precisions fp32)
  fi
  timeout "${THROUGHPUT_SECONDS:-300}" "$PYTHON" scripts/throughput.py "${throughput[@]}" --out "$work/throughput" \
    || echo "throughput: exit status $?"
  timeout "${TIMING_SECONDS:-200}" "$PYTHON" -m dlrt.bench --device "$device" --suite timing_study \
    --graphs without --ranks "$ranks" --ts-max-seconds 5 --out "$work" "$@" || echo "timing study: exit status $?"
  # CUDA graphs (adaptive_graphed against dense) last, in a process of their own, into graphed/: a capture
  # that fails can leave the GPU unusable for the rest of its process
  if [[ "$device" == cuda ]]; then
    timeout "${GRAPHS_SECONDS:-200}" "$PYTHON" -m dlrt.bench --device cuda --suite steps,timing_study --graphs only \
      --ranks "$ranks" --ts-max-seconds 5 --out "$work/graphed" "$@" || echo "graphed steps: exit status $?"
  fi
} 2>&1 | tee "$out/gpu_checks.log"
tar -czf "$out/gpu_bench.tar.gz" -C "$work" .
