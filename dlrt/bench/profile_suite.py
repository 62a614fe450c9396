"""The profile suite (run only when named): where one training step's time goes, by aten operation, under
torch.profiler over a few steps of one bench case. The profiles quoted in results/bench/README.md come from it:

    dlrt-bench --suite profile --profile-case timing_study --profile-method fixed        # rank 640 of the study
    dlrt-bench --suite profile --profile-case fc500_t0.09 --profile-method adaptive --profile-shapes
    dlrt-bench --suite profile --device cuda --profile-case lenet5_t0.15 --profile-method adaptive_graphed \\
        --profile-steps 20

After three warm-up steps it times --profile-steps steps (median wall time), then profiles as many more; the
profiler adds overhead of its own. Its rows dlrt::qr, dlrt::svd, ... are the labelled parts of the DLRT step
(dlrt.functional.PARTS). Ranks are pinned, as in the steps suite; the timing-study case takes --profile-rank, --width
and --ts-batch. On CUDA the steps are synchronised and a second table gives the GPU's time per kernel.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .cases import make_runner, pin_ranks, step_cases, synthetic_batches, timing_study_case
from .output import Meta, ranks_str, table

METHODS = ("dense", "adaptive", "parallel", "fixed", "vanilla", "adaptive_graphed")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("profile suite (--suite profile)")
    cases = [case.name for case in step_cases(quick=False)]
    group.add_argument("--profile-case", default="fc500_t0.09", choices=[*cases, "timing_study"])
    group.add_argument("--profile-method", default="adaptive", choices=METHODS)
    group.add_argument("--profile-rank", type=int, default=640, help="timing study: the rank of all four layers")
    group.add_argument("--profile-steps", type=int, default=3, help="steps timed, then as many profiled")
    group.add_argument("--profile-rows", type=int, default=25, help="rows of the printed tables")
    group.add_argument("--profile-shapes", action="store_true", help="one row per operation and input shapes")


def check_arguments(args, error) -> None:
    if "profile" not in args.suites:
        return
    if args.profile_method == "adaptive_graphed" and args.device != "cuda":
        error("--profile-method adaptive_graphed needs --device cuda")
    for name in ("profile_rank", "profile_steps", "profile_rows"):
        if getattr(args, name) < 1:
            error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    if args.profile_case == "timing_study":
        case = timing_study_case(args.profile_rank, args.width, args.ts_batch)
    else:
        case = next(c for c in step_cases(quick=False) if c.name == args.profile_case)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    batches = synthetic_batches(case, device, 2)
    runner = make_runner(args.profile_method, case, device, svd_on=args.svd_on)
    if args.profile_method != "dense":
        pin_ranks(runner.opt)
    for _ in range(3):  # warm-up: states made (graphed: an eager step, the capture, a replay)
        runner.step(*batches[0])
    seconds = []
    for i in range(args.profile_steps):
        sync()
        started = time.perf_counter()
        runner.step(*batches[i % 2])
        sync()
        seconds.append(time.perf_counter() - started)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.profile_shapes) as prof:
        for i in range(args.profile_steps):
            runner.step(*batches[i % 2])
        sync()
    step = {"case": case.name, "method": args.profile_method, "batch": case.batch,
            "ranks": ranks_str(runner.opt.ranks()) if args.profile_method != "dense" else "dense",
            "median_step_ms": 1e3 * statistics.median(seconds), "steps": args.profile_steps}
    rows = []
    for event in prof.key_averages(group_by_input_shape=args.profile_shapes):
        rows.append({**step, "operation": event.key, "input_shapes": str(event.input_shapes or ""),
                     "calls": event.count, "self_cpu_ms": event.self_cpu_time_total / 1e3,
                     "cpu_ms": event.cpu_time_total / 1e3,
                     "self_device_ms": getattr(event, "self_device_time_total", 0) / 1e3, **meta.fields})
    return sorted(rows, key=lambda r: -r["self_cpu_ms"])


def report(rows: list[dict], args, meta: Meta, say) -> None:
    first = rows[0]
    say(f"{first['case']} {first['method']}, ranks {first['ranks']}, batch {first['batch']}, {meta.fields['threads']} "
        f"thread(s): median step {first['median_step_ms']:.1f} ms over {first['steps']} steps")
    columns = ["operation", *(["input_shapes"] if args.profile_shapes else []), "calls", "self_cpu_ms", "cpu_ms"]
    say(f"torch.profiler over {first['steps']} steps (totals, not per step), by self CPU time:")
    say(table(rows[:args.profile_rows], columns))
    if meta.fields["device"] == "cuda":
        say(f"the same steps by the GPU's time (totals over {first['steps']} steps):")
        by_device = sorted(rows, key=lambda r: -r["self_device_ms"])[:args.profile_rows]
        say(table(by_device, [*columns[:-2], "self_device_ms"]))
