"""dlrt-bench's command line: which suites, their sizes, the device and threads; then each suite writes
<suite>.csv and <suite>.txt (the printed tables) to --out.

    dlrt-bench                                # every suite, default sizes, into bench_out/ (not tracked by git)
    dlrt-bench --out results/bench            # the committed results: only when asked by path
    dlrt-bench --suite steps --device cuda
    dlrt-bench --suite timing_study --ranks 5,20,80,320
    dlrt-bench --suite profile --profile-case timing_study --profile-method fixed --threads 1
    dlrt-bench --suite torchvision --threads 1    # VGG16, ResNet-50 at ImageNet shapes (only when named, as profile
    dlrt-bench --suite throughput                 # and throughput: each module's docstring says more)
    python -m dlrt.bench --quick --out /tmp/b # seconds: tiny sizes, for tests

It needs torch (and tqdm, matplotlib), never Hydra or OmegaConf: it runs from a plain checkout on a GPU machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import torch

from dlrt.experiments.run_folder import RunFolderError
from dlrt.experiments.devices import resolve_device
from dlrt.linalg import torch_threads
from dlrt.placement import SVD_PLACES

from . import (breakdown, linalg_suite, memory_suite, profile_suite, steps, throughput_suite, timing_study,
               torchvision_suite)
from .output import Meta, Report, contention_warning, report_errors, write_rows
from .timing_study import CPU_TIMING_RANKS, PAPER_TIMING_RANKS

# each suite: run(args, device, meta) -> rows, report(rows, args, meta, say)
SUITES = {"steps": steps, "timing_study": timing_study, "breakdown": breakdown, "linalg": linalg_suite,
          "memory": memory_suite}
# run only when named: a diagnostic of one case (profile), minutes of torchvision's nets, processes of their own
# (throughput); each adds its own options (add_arguments) and checks them (check_arguments)
NAMED_ONLY = {"profile": profile_suite, "torchvision": torchvision_suite, "throughput": throughput_suite}

DEFAULT_OUT = "bench_out"  # untracked: a bench run never overwrites the committed results/bench unless asked
# option: (with --quick, without)
DEFAULTS = {
    "steps": (3, 100), "infer_steps": (3, 100), "warmup": (1, 10), "rounds": (1, 10), "min_steps": (1, 3),
    "max_seconds": (5.0, 30.0), "width": (64, 5120), "ts_batch": (16, 500), "ts_steps": (2, 10),
    "ts_warmup": (1, 2), "ts_max_seconds": (5.0, 15.0), "breakdown_steps": (2, 50), "linalg_reps": (2, 50),
    "batches": (4, 64),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 5,10,20, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be integers >= 1, got {text!r}")
    return values


def _count(low: int):
    """An argparse type: an integer >= low (a count of steps, a size)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dlrt-bench", description="Time DLRT training steps and inference against "
                                "dense training, in one process (dlrt.bench).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="all", help=f"comma-separated subset of {','.join(SUITES)}, or 'all' (all of "
                   f"these); {', '.join(NAMED_ONLY)} run only when named")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=_count(1), default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the CSVs and the plot (results/bench holds the "
                   "committed ones)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (for tests; numbers are not meaningful)")
    p.add_argument("--steps", type=_count(1), default=None, help="timed training steps per method (steps suite) [100]")
    p.add_argument("--infer-steps", type=_count(1), default=None, help="timed inference passes per method [100]")
    p.add_argument("--warmup", type=_count(0), default=None, help="untimed steps per runner first [10]")
    p.add_argument("--rounds", type=_count(1), default=None, help="interleaved rounds the timed steps are split into [10]")
    p.add_argument("--min-steps", type=_count(1), default=None, help="timed steps a runner takes at least [3]")
    p.add_argument("--max-seconds", type=_seconds, default=None, help="time budget per runner and phase, steps suite [30]")
    p.add_argument("--ranks", type=_int_list, default=None,
                   help=f"timing-study ranks [CUDA: {','.join(map(str, PAPER_TIMING_RANKS))}; "
                        f"CPU: {','.join(map(str, CPU_TIMING_RANKS))}]")
    p.add_argument("--width", type=_count(1), default=None, help="timing-study layer width [5120]")
    p.add_argument("--ts-batch", type=_count(1), default=None, help="timing-study batch [500]")
    p.add_argument("--ts-steps", type=_count(1), default=None, help="timing-study timed steps per method and rank [10]")
    p.add_argument("--ts-warmup", type=_count(0), default=None, help="timing-study untimed steps first [2]")
    p.add_argument("--ts-max-seconds", type=_seconds, default=None, help="timing-study budget per runner and phase [15]")
    p.add_argument("--breakdown-steps", type=_count(1), default=None, help="steps timed part by part [50]")
    p.add_argument("--linalg-reps", type=_count(1), default=None, help="repetitions per linalg variant [50]")
    p.add_argument("--batches", type=_count(1), default=None,
                   help="distinct synthetic batches per case, cycled (timing study: a 1/8 of it) [64]")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.set_flush_denormal(True) while timing (CPU): subnormal floats are slow on x86 "
                        "and say nothing about the method")
    p.add_argument("--graphs", choices=("with", "without", "only"), default="with",
                   help="CUDA only: time adaptive_graphed (CUDA graphs) beside the other methods, not at all, or "
                        "alone with dense (a capture that fails can leave the GPU unusable for the rest of the "
                        "process: gpu_checks.sh measures the graphed steps in a process of their own)")
    p.add_argument("--basis-every", type=_int_list, default=[1],
                   help="steps and timing study: also time each rank-adaptive method at basis_every = k for each k "
                        "given (a basis step every k-th batch; its time per step is the mean over a whole cycle)")
    p.add_argument("--memory-cases", type=lambda text: [c for c in text.split(",") if c], default=[],
                   help="memory suite: only the cases whose names start with one of these (timing_study_r320,lenet5)")
    p.add_argument("--imagenet-batch", type=int, default=0,
                   help="steps suite: also ResNet-50 at ImageNet shapes with this batch (dense and adaptive; 0: not)")
    p.add_argument("--svd-on", choices=SVD_PLACES, default="auto",
                   help="where the rank-adaptive steps take the SVDs of their cores (DLRTOptimizer's svd_on)")
    p.add_argument("--wait-idle", type=_seconds, default=0.0,
                   help="before each case wait up to this many seconds for other processes to leave the CPU")
    for suite in NAMED_ONLY.values():
        suite.add_arguments(p)
    args = p.parse_args(argv)

    for name, (small, full) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    suites = tuple(SUITES) if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = [s for s in suites if s not in SUITES and s not in NAMED_ONLY]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}: choose from {', '.join([*SUITES, *NAMED_ONLY])} or 'all'")
    args.suites = suites
    for suite in NAMED_ONLY.values():
        suite.check_arguments(args, p.error)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    if not args.out.strip():
        p.error("--out is empty: give a folder")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    prog = "dlrt-bench" if argv is None and os.path.basename(sys.argv[0]) == "dlrt-bench" else "python -m dlrt.bench"
    args = parse_args(args_list)
    device = resolve_device(args.device)
    with torch_threads(args.threads):  # restored after: main() may be called inside a longer-lived process
        flushing = bool(args.flush_denormal) and torch.set_flush_denormal(True)  # False where the CPU cannot
        try:
            return run_suites(args, device, Meta(device, shlex.join([prog, *args_list]), flushing))
        except (OSError, RunFolderError) as e:  # --out cannot be made or written (a full disk): what was written stays
            print(f"dlrt-bench: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        finally:
            if flushing:
                torch.set_flush_denormal(False)


def run_suites(args, device: torch.device, meta: Meta) -> int:
    if args.ranks is None:
        args.ranks, args.ranks_note = timing_study.default_ranks(args.quick, device)
    else:
        args.ranks_note = "from --ranks"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    say = report.say
    say(f"dlrt-bench on {meta.fields['device_name']} [{device}], torch {meta.fields['torch']}, "
        f"{meta.fields['threads']} thread{'s' if meta.fields['threads'] != 1 else ''}, {meta.fields['date']}")
    say(f"command: {meta.fields['command']} (code {meta.fields['code_version']})")
    if args.quick:
        say("--quick: tiny sizes and few steps; the numbers below are not meaningful")
    for name, suite in {**SUITES, **NAMED_ONLY}.items():
        if name not in args.suites:
            continue
        report.section()
        rows = suite.run(args, device, meta)
        write_rows(out / f"{name}.csv", rows)
        suite.report(rows, args, meta, say)
        contention_warning(rows, device, say)
        report_errors(rows, say)
        report.save(out / f"{name}.txt")
    written = [f"{s}.csv, {s}.txt" for s in args.suites] + [f"{s}.png" for s in ("timing_study", "memory")
                                                                 if s in args.suites]
    print(f"\nwrote {', '.join(written)} to {out}", flush=True)
    return 0
