"""Where one training step's time goes, by aten operation: torch.profiler over a few steps of a bench case.

The profiles quoted in results/bench/README.md come from this script, e.g. the fixed-rank step at rank 640 of
the timing study and the FC step at the ϑ = 0.09 ranks:

    python scripts/profile_step.py --case timing_study --rank 640 --method fixed
    python scripts/profile_step.py --case fc500_t0.09 --method adaptive --shapes

After one warm-up step it times --steps steps (median wall time), then profiles as many more and prints
the profiler's table (the profiler adds some overhead of its own); its rows dlrt::qr, dlrt::svd, ... are the
labelled parts of the DLRT step (dlrt.functional.PARTS). One thread unless --threads says otherwise;
subnormals flushed as in dlrt-bench; ranks pinned, as in the bench. With --device cuda the steps
are synchronised and a second table gives the GPU's time per kernel; there adaptive_graphed (CUDA graphs)
can be profiled too:

    python scripts/profile_step.py --device cuda --case lenet5_t0.15 --method adaptive_graphed --steps 20
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dlrt.bench.cases import make_runner, pin_ranks, step_cases, synthetic_batches, timing_study_case
from dlrt.optim import SVD_PLACES

METHODS = ("dense", "adaptive", "parallel", "fixed", "vanilla", "adaptive_graphed")


def main(argv=None) -> int:
    cases = [case.name for case in step_cases(quick=False)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="fc500_t0.09", choices=[*cases, "timing_study"])
    parser.add_argument("--method", default="adaptive", choices=METHODS)
    parser.add_argument("--rank", type=int, default=640, help="timing study: the rank of all four layers [640]")
    parser.add_argument("--width", type=int, default=5120, help="timing study: the layer width [5120]")
    parser.add_argument("--batch", type=int, default=None, help="batch size [the case's]")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then profiled [3]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", action="store_true", help="one row per operation and input shapes")
    parser.add_argument("--rows", type=int, default=25, help="rows of the table [25]")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--svd-on", choices=SVD_PLACES, default="auto", help="DLRTOptimizer's svd_on [auto]")
    args = parser.parse_args(argv)
    if args.method == "adaptive_graphed" and args.device != "cuda":
        parser.error("adaptive_graphed needs --device cuda")

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if args.case == "timing_study":
        case = timing_study_case(args.rank, args.width, args.batch or 500)
    else:
        case = next(c for c in step_cases(quick=False) if c.name == args.case)
        case.batch = args.batch or case.batch
    batches = synthetic_batches(case, device, 2)
    runner = make_runner(args.method, case, device, svd_on=args.svd_on)
    if args.method != "dense":
        pin_ranks(runner.opt)
    for _ in range(3):  # warm-up: states made (graphed: an eager step, the capture, a replay)
        runner.step(*batches[0])
    seconds = []
    for i in range(args.steps):
        sync()
        started = time.perf_counter()
        runner.step(*batches[i % 2])
        sync()
        seconds.append(time.perf_counter() - started)
    ranks = runner.opt.ranks() if args.method != "dense" else "dense"
    print(f"{case.name} {args.method}, ranks {ranks}, "
          f"batch {case.batch}, {args.threads} thread(s): median step {1e3 * statistics.median(seconds):.1f} ms "
          f"over {args.steps} steps")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for i in range(args.steps):
            runner.step(*batches[i % 2])
        sync()
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    print(f"torch.profiler over {args.steps} steps (totals, not per step):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(f"the same steps by the GPU's time (totals over {args.steps} steps):")
        print(averages.table(sort_by="self_device_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
