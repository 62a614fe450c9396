"""dlrt-bench: time DLRT training steps and inference against dense training, in one process.

    python -m dlrt.bench                      # every suite, default sizes, results/bench/
    python -m dlrt.bench --suite steps --device cuda
    python -m dlrt.bench --suite timing_study --ranks 5,20,80,320
    python -m dlrt.bench --quick --out /tmp/b # seconds: tiny sizes, for tests

Suites (`SUITES`):

- ``steps``: LeNet5 (batch 128, the paper's ϑ=0.15 ranks [9,16,28], SGD lr 0.05) and the 5-layer FC
  784-500x4-10 (batch 256, Adam lr 1e-3) at the paper's ϑ=0.09 ranks [35,53,51,46] and at rank 40;
  methods dense (plain nn layers + torch.optim's default, the reference of every ratio), dense_fused
  (the same with torch's opt-in fused optimizer kernel: the fastest dense step torch offers),
  adaptive, adaptive_pinned, parallel, fixed, vanilla; on CUDA also adaptive_graphed (adaptive_pinned
  replayed from CUDA graphs, dlrt.graphs).
- ``timing_study``: PAPER.md §3's study, 784-W x4-10 (W=5120) at batch 500, fixed ranks, methods
  fixed and adaptive (r_min = r_max = r; on CUDA also adaptive_graphed), inference per rank, dense as reference.
- ``breakdown``: where the adaptive step of LeNet5 and FC spends its time (forward, backward, QR, SVD,
  the truncation with its host sync, the projected gradient, set_factors, update rule, optimizer-state
  moves, dense step, the rest), by wrapping those functions for the duration (synced on CUDA).
- ``linalg``: the QR/SVD calls of one adaptive step at the real shapes, as the optimizer makes them
  (one call per layer) against batched and Cholesky-based alternatives: evidence for the fast path.

How it times. Synthetic random batches already on the device (no data loading), 64 distinct ones
per case, cycled, so that no model memorises them (a memorised batch drives the gradients subnormal,
which x86 CPUs process very slowly); subnormals are also flushed to zero while timing
(--no-flush-denormal to keep them). A training step is
zero_grad + forward + cross-entropy + backward + opt.step (for ``fixed`` opt.step(closure), which runs
the second pass). Inference is one forward of the eval batch under torch.no_grad. Each runner first
takes `--warmup` untimed steps; then the runners of a case take turns in rounds (so load that comes
and goes on a shared machine hits all of them alike) and every step is timed on its own, with
torch.cuda.synchronize() before and after on CUDA. Reported: median (and quartiles) of the timed steps
and the ratio of medians to dense, in wall time and in this process's CPU time (cpu_ms: with
--threads 1 the work itself, robust to other processes taking turns on the cores).

Ranks. ``adaptive`` and ``parallel`` run honestly at the case's ϑ from the stated starting ranks, and
may move their ranks on random data: the CSV has the ranks at the start and the end of timing and
whether they ever changed. ``adaptive_pinned`` is the same step with r_min = r_max = the starting
ranks per layer (it does the whole truncation, then the clamp keeps the rank): the cost of the step
exactly at the stated ranks.

The machine. On a shared CPU other processes steal time: each row records `others_cpu_pct`, the share
of all cores that other processes used while it was timed (from /proc/stat), and the load average.
`--wait-idle SECONDS` waits (up to that long) for a quiet machine before each case.

A method whose step raises (e.g. an SVD that fails to converge) is reported with its error in the
CSV's `error` column and left out; the other methods' results are kept. Every suite writes
<suite>.csv and <suite>.txt (the printed table) to --out, atomically; timing_study also a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import io
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import integrators as ig
from . import layers as lr_layers
from .graphs import GraphedStep
from .models import build_model
from .optim import SVD_PLACES, DLRTOptimizer
from .provenance import CODE_VERSION

SUITES = ("steps", "timing_study", "breakdown", "linalg")
STEP_METHODS = ("dense", "dense_fused", "adaptive", "adaptive_pinned", "parallel", "fixed", "vanilla")
CUDA_STEP_METHODS = STEP_METHODS + ("adaptive_graphed",)
TIMING_METHODS = ("fixed", "adaptive")
PAPER_TIMING_RANKS = (5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)
# On a 2-core CPU one adaptive step at r=1280 takes ~10 s (QR of 5120x2560, SVD of 2560x2560 per
# layer) and building the model minutes: the CPU default stops at 640, past the crossover.
CPU_TIMING_RANKS = (5, 10, 20, 40, 80, 160, 320, 640)
QUICK_TIMING_RANKS = (4, 8)
# ranks whose 2r x 2r cores the linalg suite also factorises: where the timing study's adaptive step is slow
# on a GPU (a CPU takes the first two: 640 would add minutes)
CORE_RANKS = (80, 160, 640)


def step_methods(device: torch.device, graphs: str = "with") -> tuple[str, ...]:
    """The steps suite's methods; dense first (the reference of every ratio)."""
    if device.type != "cuda" or graphs == "without":
        return STEP_METHODS
    return ("dense", "adaptive_graphed") if graphs == "only" else CUDA_STEP_METHODS


def timing_methods(device: torch.device, graphs: str = "with") -> list[str]:
    if device.type != "cuda" or graphs == "without":
        return list(TIMING_METHODS)
    return ["adaptive_graphed"] if graphs == "only" else [*TIMING_METHODS, "adaptive_graphed"]


@dataclass
class Case:
    """One model at one set of ranks with its training recipe (PAPER.md §2)."""

    name: str
    model: str
    options: dict
    rank: int | list[int]
    batch: int
    tau: float
    optimizer: str  # "sgd" or "adam", for DLRT and the dense baseline alike
    lr: float
    input_shape: tuple = (1, 28, 28)
    num_classes: int = 10


def step_cases(quick: bool) -> list[Case]:
    """The paper's recipes (PAPER.md §2, §3); --quick keeps the shapes and cuts the batches to 16."""
    small = lambda batch: 16 if quick else batch
    return [
        Case("lenet5_t0.15", "lenet5", {}, [9, 16, 28], small(128), 0.15, "sgd", 0.05),
        Case("fc500_t0.09", "fc", {"width": 500}, [35, 53, 51, 46], small(256), 0.09, "adam", 1e-3),
        Case("fc500_r40", "fc", {"width": 500}, 40, small(256), 0.09, "adam", 1e-3),
    ]


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


class CpuShare:
    """How much of the machine's CPU other processes used between start() and stop() (Linux only)."""

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, in the same clock ticks
            return sum(ticks), sum(ticks) - ticks[3] - ticks[4], own
        except (OSError, ValueError, IndexError):
            return None

    def __init__(self):
        self.begin = self._read()
        self.ticks = [0, 0, 0]  # total, busy, own: accumulated over start/stop windows
        self.ok = self.begin is not None

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> None:
        end = self._read()
        if self.begin is None or end is None:
            self.ok = False
            return
        self.ticks = [t + e - b for t, e, b in zip(self.ticks, end, self.begin)]

    def others_pct(self) -> float:
        """Other processes' CPU use as % of all cores, over the windows so far (up to now if none closed)."""
        if not any(self.ticks):
            self.stop()
        total, busy, own = self.ticks
        if not self.ok or total <= 0:
            return float("nan")
        return max(0.0, 100.0 * (busy - own) / total)


def wait_for_idle(max_seconds: float, threshold_pct: float = 10.0, window: float = 2.0) -> float:
    """Wait until other processes use < threshold_pct of the CPUs over `window` s; returns seconds waited."""
    start = time.perf_counter()
    while max_seconds > 0 and time.perf_counter() - start < max_seconds:
        share = CpuShare()
        time.sleep(window)
        if not share.others_pct() >= threshold_pct:  # NaN (no /proc) counts as idle
            break
    return time.perf_counter() - start


class Meta:
    """Columns every CSV row carries."""

    def __init__(self, device: torch.device, command: str, flush_denormal: bool):
        self.fields = {
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": flush_denormal,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "code_version": CODE_VERSION,
        }


# ---------------------------------------------------------------------------------------------
# runners: one model + optimizer that can take a training step and an inference pass
# ---------------------------------------------------------------------------------------------


@dataclass
class Runner:
    name: str
    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], None] | None  # None: an inference-only runner
    opt: torch.optim.Optimizer | None
    train_ms: list = field(default_factory=list)
    train_cpu_ms: list = field(default_factory=list)
    infer_ms: list = field(default_factory=list)
    infer_cpu_ms: list = field(default_factory=list)
    ranks_seen: list = field(default_factory=list)
    cpu_share: CpuShare = field(default_factory=CpuShare)
    error: str = ""  # set when a step raised: the runner is then left out of further timing

    def ranks(self) -> list[int]:
        return [layer.rank for layer in lr_layers.low_rank_layers(self.model)]

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> None:
        self.model(x)


def _dense_optimizer(params, name: str, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    kind = torch.optim.Adam if name == "adam" else torch.optim.SGD
    return kind(params, lr=lr, fused=fused or None)  # None: torch's default implementation


def make_step(model: nn.Module, opt: torch.optim.Optimizer, closure_step: bool):
    """zero_grad + forward + cross-entropy + backward + opt.step (opt.step(closure) when asked)."""

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if closure_step:
            def closure():
                opt.zero_grad()
                again = F.cross_entropy(model(x), y)
                again.backward()
                return again
            opt.step(closure)
        else:
            opt.step()

    return step


def pin_ranks(opt: DLRTOptimizer) -> None:
    """Clamp every layer's rank to the one it has now (per-layer r_min = r_max)."""
    if not (isinstance(getattr(opt, "_r_min", None), list) and isinstance(getattr(opt, "_r_max", None), list)):
        raise RuntimeError("pin_ranks relies on DLRTOptimizer's per-layer _r_min/_r_max lists, which are gone: "
                           "update dlrt.bench.pin_ranks to the optimizer's new way of bounding ranks")
    ranks = opt.ranks()
    opt._r_min, opt._r_max = list(ranks), list(ranks)


def build(case: Case, device: torch.device, low_rank: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with device:  # factors are drawn and factorised on the device itself (fast on a GPU)
        model = build_model(case.model, case.input_shape, case.num_classes, low_rank=low_rank,
                            rank=case.rank if low_rank else None, **case.options)
    return model.to(device)


def make_runner(method: str, case: Case, device: torch.device, base: nn.Module | None = None,
                r_min: int | None = None, r_max: int | None = None, svd_on: str = "auto") -> Runner:
    """A fresh model and optimizer for `method`; low-rank models are copies of `base` when given."""
    if method in ("dense", "dense_fused"):
        model = build(case, device, low_rank=False)
        opt = _dense_optimizer(model.parameters(), case.optimizer, case.lr, fused=method == "dense_fused")
        return Runner(method, model, make_step(model, opt, False), opt)
    model = copy.deepcopy(base) if base is not None else build(case, device, low_rank=True)
    dlrt_method = "adaptive" if method in ("adaptive_pinned", "adaptive_graphed") else method
    options = {} if r_min is None else {"r_min": r_min, "r_max": r_max}
    opt = DLRTOptimizer(model, lr=case.lr, tau=case.tau, method=dlrt_method, optimizer=case.optimizer,
                        svd_on=svd_on, **options)
    if method in ("adaptive_pinned", "adaptive_graphed"):
        pin_ranks(opt)
    if method == "adaptive_graphed":
        return Runner(method, model, GraphedStep(model, opt, F.cross_entropy), opt)
    return Runner(method, model, make_step(model, opt, dlrt_method == "fixed"), opt)


def synthetic_batches(case: Case, device: torch.device, count: int, seed: int = 1):
    """`count` distinct random batches (inputs and labels) on the device.

    Enough of them that the timed steps do not memorise them: a dense FC net fits 4 batches of random
    labels in ~30 Adam steps, and once its loss is ~0 the gradients go subnormal and the CPU slows down
    for reasons that have nothing to do with the method (seen: a dense backward 10x slower).
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn((case.batch, *case.input_shape), generator=g)
        y = torch.randint(0, case.num_classes, (case.batch,), generator=g)
        batches.append((x.to(device), y.to(device)))
    return batches


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def _no_gc():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def time_runners(runners: list[Runner], batches, device, *, phase: str, warmup: int, steps: int,
                 rounds: int, min_steps: int, max_seconds: float, progress=None) -> None:
    """Warm every runner up, then time `steps` steps each in `rounds` interleaved rounds.

    A runner stops early (after at least `min_steps`) once it has spent `max_seconds` timing.
    """
    sync = _sync(device)
    eval_x = batches[0][0]

    def one(runner: Runner, index: int) -> tuple[float, float]:
        x, y = batches[index % len(batches)]
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        if phase == "train":
            runner.step(x, y)
        else:
            runner.infer(eval_x)
        sync()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    def failed(runner: Runner, error: Exception) -> None:
        runner.error = f"{phase} step {len(runner.train_ms if phase == 'train' else runner.infer_ms)}: " \
                       f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(f"\n{runner.name}: {runner.error} (left out of timing)", file=sys.stderr)

    runners = [r for r in runners if not r.error]
    for runner in runners:
        try:
            for i in range(warmup):
                one(runner, i)
        except Exception as error:  # a failing method must not take the others' results down with it
            failed(runner, error)
    runners = [r for r in runners if not r.error]
    per_round = max(1, math.ceil(steps / max(1, rounds)))
    spent = defaultdict(float)
    counts = defaultdict(int)
    with _no_gc():
        while any(counts[r.name] < steps for r in runners):
            for runner in runners:
                if counts[runner.name] >= steps or runner.error:
                    counts[runner.name] = steps
                    continue
                if counts[runner.name] >= min_steps and spent[runner.name] >= max_seconds * 1e3:
                    counts[runner.name] = steps  # budget spent: done
                    continue
                runner.cpu_share.start()
                for _ in range(min(per_round, steps - counts[runner.name])):
                    if counts[runner.name] >= min_steps and spent[runner.name] >= max_seconds * 1e3:
                        break  # budget spent within the round: the outer check ends this runner
                    try:
                        wall, cpu = one(runner, counts[runner.name])
                    except Exception as error:
                        failed(runner, error)
                        break
                    counts[runner.name] += 1
                    spent[runner.name] += wall
                    if phase == "train":
                        runner.train_ms.append(wall)
                        runner.train_cpu_ms.append(cpu)
                        runner.ranks_seen.append(tuple(runner.ranks()))
                    else:
                        runner.infer_ms.append(wall)
                        runner.infer_cpu_ms.append(cpu)
                    if progress is not None:
                        progress.update(1)
                runner.cpu_share.stop()


def _quantile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values) -> dict:
    return {
        "median_ms": _quantile(values, 0.5),
        "p25_ms": _quantile(values, 0.25),
        "p75_ms": _quantile(values, 0.75),
        "min_ms": min(values) if values else float("nan"),
        "n": len(values),
    }


def _cpu_columns(cpu_ms: list, dense_cpu_median: float) -> dict:
    """Median process CPU time per step and its ratio to dense: with --threads 1 this is the work done,
    robust to other processes taking turns on the cores (with more threads it also counts spin-waits)."""
    median = _quantile(cpu_ms, 0.5)
    return {"cpu_ms": median, "cpu_ratio_to_dense": median / dense_cpu_median}


def _ranks_str(ranks) -> str:
    return "[" + ",".join(str(r) for r in ranks) + "]" if ranks else ""


# ---------------------------------------------------------------------------------------------
# suites
# ---------------------------------------------------------------------------------------------


def suite_steps(args, device, meta: Meta) -> list[dict]:
    rows = []
    cases = step_cases(args.quick)
    from tqdm import tqdm

    methods = step_methods(device, args.graphs)
    total = len(cases) * len(methods) * (args.steps + args.infer_steps)
    with tqdm(total=total, desc="steps", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        for case in cases:
            waited = wait_for_idle(args.wait_idle)
            base = build(case, device, low_rank=True)
            runners = [make_runner(m, case, device, base, svd_on=args.svd_on) for m in methods]
            ranks_start = {r.name: r.ranks() for r in runners}
            batches = synthetic_batches(case, device, args.batches)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            common = dict(warmup=args.warmup, rounds=args.rounds, progress=bar, max_seconds=args.max_seconds,
                          min_steps=args.min_steps)
            time_runners(runners, batches, device, phase="train", steps=args.steps, **common)
            time_runners(runners, batches, device, phase="infer", steps=args.infer_steps, **common)
            dense = {ph: summary(getattr(runners[0], f"{ph}_ms"))["median_ms"] for ph in ("train", "infer")}
            dense_cpu = {ph: _quantile(getattr(runners[0], f"{ph}_cpu_ms"), 0.5) for ph in ("train", "infer")}
            for runner in runners:
                changed = len(set(runner.ranks_seen)) > 1 or (runner.ranks_seen and
                                                              list(runner.ranks_seen[0]) != ranks_start[runner.name])
                for phase in ("train", "infer"):
                    stats = summary(getattr(runner, f"{phase}_ms"))
                    rows.append({
                        "suite": "steps", "case": case.name, "model": case.model, "method": runner.name,
                        "phase": phase, "batch": case.batch,
                        "ranks_start": _ranks_str(ranks_start[runner.name]),
                        "ranks_end": _ranks_str(runner.ranks()),
                        "ranks_changed": bool(changed) if not runner.name.startswith("dense") else "",
                        "tau": case.tau if not runner.name.startswith("dense") else "", "optimizer": case.optimizer,
                        "lr": case.lr, **stats,
                        "ratio_to_dense": stats["median_ms"] / dense[phase],
                        **_cpu_columns(getattr(runner, f"{phase}_cpu_ms"), dense_cpu[phase]),
                        "others_cpu_pct": runner.cpu_share.others_pct(), "loadavg_1m": load,
                        "waited_s": round(waited, 1), "error": runner.error, **meta.fields,
                    })
            del runners, base
    return rows


def suite_timing_study(args, device, meta: Meta) -> list[dict]:
    from tqdm import tqdm

    width = args.width
    ranks = args.ranks
    case = Case("timing_study", "fc", {"width": width}, 1, args.ts_batch, 0.1, "sgd", 0.01)
    batches = synthetic_batches(case, device, max(2, args.batches // 8))
    timed = dict(warmup=args.ts_warmup, rounds=1, min_steps=args.min_steps, max_seconds=args.ts_max_seconds)
    methods = timing_methods(device, args.graphs)
    total = (1 + len(methods) * len(ranks)) * args.ts_steps + (1 + len(ranks)) * args.ts_steps
    rows = []
    with tqdm(total=total, desc="timing study", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        waited = wait_for_idle(args.wait_idle)
        dense = make_runner("dense", case, device)
        time_runners([dense], batches, device, phase="train", steps=args.ts_steps, progress=bar, **timed)
        time_runners([dense], batches, device, phase="infer", steps=args.ts_steps, progress=bar, **timed)
        ref = {ph: summary(getattr(dense, f"{ph}_ms"))["median_ms"] for ph in ("train", "infer")}
        ref_cpu = {ph: _quantile(getattr(dense, f"{ph}_cpu_ms"), 0.5) for ph in ("train", "infer")}

        def row(method, phase, runner, rank, actual, waited):
            stats = summary(getattr(runner, f"{phase}_ms"))
            return {"suite": "timing_study", "width": width, "rank": rank, "layer_ranks": _ranks_str(actual),
                    "method": method, "phase": phase, "batch": case.batch, "optimizer": case.optimizer,
                    "lr": case.lr, **stats, "ratio_to_dense": stats["median_ms"] / ref[phase],
                    **_cpu_columns(getattr(runner, f"{phase}_cpu_ms"), ref_cpu[phase]),
                    "others_cpu_pct": runner.cpu_share.others_pct(), "waited_s": round(waited, 1),
                    "error": runner.error, **meta.fields}

        rows += [row("dense", ph, dense, "", [], waited) for ph in ("train", "infer")]
        del dense
        for rank in ranks:
            waited = wait_for_idle(args.wait_idle)
            case.rank = rank
            bar.set_postfix_str(f"rank {rank}: building")
            base = build(case, device, low_rank=True)
            bar.set_postfix_str(f"rank {rank}")
            runners = [make_runner(m, case, device, base, r_min=rank, r_max=rank, svd_on=args.svd_on) for m in methods]
            infer = Runner("low_rank", base, None, None)  # the untrained model: inference needs no optimizer
            del base
            time_runners(runners, batches, device, phase="train", steps=args.ts_steps, progress=bar, **timed)
            time_runners([infer], batches, device, phase="infer", steps=args.ts_steps, progress=bar, **timed)
            for runner in runners:
                rows.append(row(runner.name, "train", runner, rank, runner.ranks(), waited))
                if runner.name == "adaptive_graphed" and runner.error:  # a capture that failed once fails at
                    methods.remove("adaptive_graphed")                # every rank: do not try it again
            rows.append(row("low_rank", "infer", infer, rank, infer.ranks(), waited))
            del runners, infer
    return rows


def crossover(rows: list[dict], method: str, phase: str, key: str = "ratio_to_dense") -> str:
    """Where `method` stops being faster than dense: interpolated on log-log between measured ranks."""
    points = sorted((r["rank"], r[key]) for r in rows
                    if r["method"] == method and r["phase"] == phase and r["rank"] != "" and r[key] == r[key])
    if not points:
        return "n/a"
    if points[0][1] > 1:
        return f"< {points[0][0]} (slower than dense at every measured rank)"
    for (r0, q0), (r1, q1) in zip(points, points[1:]):
        if q0 <= 1 < q1:
            t = (0 - math.log(q0)) / (math.log(q1) - math.log(q0))
            est = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
            return f"~{est:.0f} (faster at {r0}: x{q0:.2f}, slower at {r1}: x{q1:.2f})"
    return f"> {points[-1][0]} (faster than dense at every measured rank)"


# --- breakdown ---------------------------------------------------------------------------------


class PartTimer:
    """Accumulates wall time per named part; wraps functions so every call is timed (synced on CUDA)."""

    def __init__(self, sync):
        self.sync = sync
        self.ms = defaultdict(float)
        self.cpu_ms = defaultdict(float)
        self.calls = defaultdict(int)

    @contextlib.contextmanager
    def part(self, name):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.ms[name] += (time.perf_counter() - t0) * 1e3
            self.cpu_ms[name] += (time.process_time() - c0) * 1e3
            self.calls[name] += 1

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed


@contextlib.contextmanager
def patched_parts(timer: PartTimer, opt):
    """Time the QR, SVD, truncation (with its host sync), projected gradient, set_factors, update rule,
    optimizer-state moves and dense step calls made inside DLRTOptimizer.step, by wrapping the functions
    it looks up at call time. A name that has gone from the library is skipped (its time stays in
    step_other), so the breakdown keeps working while the optimizer changes."""
    from . import optim as optim_module

    targets = [
        (torch.linalg, "qr", "qr"),
        (torch.linalg, "svd", "svd"),
        (torch.linalg, "eigh", "svd"),  # gram_svd, the CPU's SVD of the core
        (ig, "truncation_rank_tensor", "truncation+sync"),  # the part's own sync stands for the step's
        (lr_layers._LowRankLayer, "project_gradient", "project_gradient"),
        (lr_layers._LowRankLayer, "set_factors", "set_factors"),
        (optim_module, "change_basis", "state_moves"),
        (optim_module, "lift_state", "state_moves"),
    ]
    if isinstance(opt, DLRTOptimizer) and hasattr(getattr(opt, "rule", None), "directions"):
        targets.append((opt.rule, "directions", "update_rule"))
    if isinstance(opt, DLRTOptimizer):
        targets.append((opt.dense_optimizer, "step", "dense_params_step"))
    saved = []
    try:
        for owner, attr, name in targets:
            if isinstance(owner, type):
                if attr not in owner.__dict__:
                    continue
                original = owner.__dict__[attr]
            elif not hasattr(owner, attr):
                continue
            else:
                original = getattr(owner, attr)
            # instance attributes we add are deleted afterwards (None), so the class's method shows again
            restore = original if isinstance(owner, (type, type(torch))) else owner.__dict__.get(attr)
            saved.append((owner, attr, restore))
            setattr(owner, attr, timer.wrap(name, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            if original is None:  # an instance attribute we added: back to the class's method
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


STEP_PARTS = ("qr", "svd", "truncation+sync", "project_gradient", "set_factors", "update_rule", "state_moves",
              "dense_params_step")


def breakdown_rows(case: Case, method: str, device, args, meta: Meta) -> list[dict]:
    runner = make_runner(method, case, device, svd_on=args.svd_on)
    model, opt = runner.model, runner.opt
    batches = synthetic_batches(case, device, args.batches)
    sync = _sync(device)
    for i in range(args.warmup):
        runner.step(*batches[i % len(batches)])
    ranks_start = runner.ranks()
    per_step = []
    share = CpuShare()
    with _no_gc():
        for i in range(args.breakdown_steps):
            x, y = batches[i % len(batches)]
            timer = PartTimer(sync)
            with timer.part("zero_grad"):
                opt.zero_grad()
            with timer.part("forward+loss"):
                loss = F.cross_entropy(model(x), y)
            with timer.part("backward"):
                loss.backward()
            with patched_parts(timer, opt):
                with timer.part("opt.step"):
                    opt.step()
            if isinstance(opt, DLRTOptimizer):  # the rest of opt.step, after the parts timed inside it
                for acc in (timer.ms, timer.cpu_ms):
                    acc["step_other"] = acc.pop("opt.step") - sum(acc.get(p, 0.0) for p in STEP_PARTS)
                timer.calls.pop("opt.step")
                timer.calls["step_other"] = 1
            per_step.append((dict(timer.ms), dict(timer.calls), dict(timer.cpu_ms)))
    others = share.others_pct()
    parts = ["zero_grad", "forward+loss", "backward"]
    parts += [p for p in ("opt.step", *STEP_PARTS, "step_other") if any(p in ms for ms, _, _ in per_step)]
    mean = {p: statistics.fmean(ms.get(p, 0.0) for ms, _, _ in per_step) for p in parts}
    mean_cpu = {p: statistics.fmean(cpu.get(p, 0.0) for _, _, cpu in per_step) for p in parts}
    total, total_cpu = sum(mean.values()), sum(mean_cpu.values())
    rows = []
    for p in parts + ["total"]:
        values = [sum(ms.values()) if p == "total" else ms.get(p, 0.0) for ms, _, _ in per_step]
        calls = 0 if p == "total" else statistics.fmean(c.get(p, 0) for _, c, _ in per_step)
        cpu = total_cpu if p == "total" else mean_cpu[p]
        rows.append({
            "suite": "breakdown", "case": case.name, "model": case.model, "method": method,
            "part": p, "mean_ms": statistics.fmean(values), "median_ms": _quantile(values, 0.5),
            "pct": 100.0 * (total if p == "total" else mean[p]) / total, "calls_per_step": calls,
            "mean_cpu_ms": cpu, "pct_cpu": 100.0 * cpu / total_cpu,
            "n": len(per_step), "batch": case.batch, "ranks_start": _ranks_str(ranks_start),
            "ranks_end": _ranks_str(runner.ranks()), "tau": case.tau if method != "dense" else "",
            "optimizer": case.optimizer, "others_cpu_pct": others,
            "note": "parts synced on CUDA (sums exceed an unsynced step)" if device.type == "cuda" else "",
            **meta.fields,
        })
    return rows


def suite_breakdown(args, device, meta: Meta) -> list[dict]:
    from tqdm import tqdm

    rows = []
    cases = step_cases(args.quick)[:2]
    jobs = [(case, m) for case in cases for m in ("dense", "adaptive")]
    for case, method in tqdm(jobs, desc="breakdown", file=sys.stderr, leave=False, dynamic_ncols=True):
        wait_for_idle(args.wait_idle)
        try:
            rows += breakdown_rows(case, method, device, args, meta)
        except Exception as error:  # keep the other cases' parts
            rows.append({"suite": "breakdown", "case": case.name, "model": case.model, "method": method,
                         "part": "total", "mean_ms": float("nan"),
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}", **meta.fields})
    return rows


# --- linalg --------------------------------------------------------------------------------------


def _cholesky_qr2(A: torch.Tensor) -> torch.Tensor:
    """Q of a thin QR via two Cholesky-QR passes (matmuls + an r x r Cholesky): fine for well-conditioned A."""
    for _ in range(2):
        R = torch.linalg.cholesky(A.mT @ A, upper=True)
        A = torch.linalg.solve_triangular(R, A, upper=True, left=False)
    return A


def _padded(mats: list[torch.Tensor]) -> torch.Tensor:
    rows = max(m.shape[-2] for m in mats)
    cols = max(m.shape[-1] for m in mats)
    return torch.stack([F.pad(m, (0, cols - m.shape[-1], 0, rows - m.shape[-2])) for m in mats])


def linalg_shapes(case: Case, device) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(rows, rank, new directions) of the factors U and V, and the SVD cores, of one adaptive step at
    the case's ranks."""
    model = build(case, device, low_rank=True)
    factors, cores = [], []
    for layer in lr_layers.low_rank_layers(model):
        r = layer.rank
        count = ig.augmentation_size(r, layer.out_dim, layer.in_dim)
        factors += [(layer.out_dim, r, count), (layer.in_dim, r, count)]
        cores.append(r + count)
    return factors, cores


def _time_variants(variants: dict, reps: int, sync, fields: dict) -> list[dict]:
    """Median ms of each variant (a callable) over `reps` calls after 3 warm-up calls, one row each."""
    rows = []
    for name, fn in variants.items():
        share = CpuShare()
        try:
            for _ in range(3):
                fn()
            times, cpu_times = [], []
            for _ in range(reps):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                cpu_times.append((time.process_time() - c0) * 1e3)
        except RuntimeError as error:  # e.g. a Cholesky of a singular padded Gram matrix
            rows.append({"suite": "linalg", **fields, "variant": name, "median_ms": float("nan"),
                         "note": f"failed: {str(error).splitlines()[0][:80]}"})
            continue
        rows.append({"suite": "linalg", **fields, "variant": name, **summary(times),
                     "cpu_ms": _quantile(cpu_times, 0.5), "note": "", "others_cpu_pct": share.others_pct()})
    return rows


def _test_cores(sizes: list[int], g: torch.Generator, device) -> list[torch.Tensor]:
    """Nearly diagonal cores with singular values in [0.1, 1.1], like an S-step's."""
    return [(torch.diag(torch.rand(k, generator=g) + 0.1) + 1e-3 * torch.randn(k, k, generator=g)).to(device)
            for k in sizes]


def suite_linalg(args, device, meta: Meta) -> list[dict]:
    """One step's worth of QR and SVD at the real shapes: the GPU's and the CPU's way (the one this
    device takes is marked "(now)") against alternatives. Then the SVD of the timing study's four
    2r x 2r cores at larger ranks, where the SVD driver, not the launch cost, decides."""
    rows = []
    sync = _sync(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    here = {True: " (now)", False: ""}
    on_cpu = device.type == "cpu"
    for case in step_cases(args.quick)[:2]:
        wait_for_idle(args.wait_idle)
        factors, cores = linalg_shapes(case, device)
        bases = [(torch.linalg.qr(torch.randn(n, r, generator=g))[0].to(device),
                  torch.randn(n, r, generator=g).to(device), count) for n, r, count in factors]
        As = [torch.cat([U0, dK], 1) for U0, dK, _ in bases]
        Ss = _test_cores(cores, g, device)
        As_pad, Ss_pad = _padded(As), _padded(Ss)
        variants = {
            f"qr: full QR of [U0, dK]{here[not on_cpu]}": lambda: [ig.new_directions(*b, projected=False) for b in bases],
            f"qr: projected, half the width{here[on_cpu]}": lambda: [ig.new_directions(*b, projected=True) for b in bases],
            "qr: one batched torch.linalg.qr of [U0, dK], zero-padded": lambda: torch.linalg.qr(As_pad),
            "qr: loop CholeskyQR2 of [U0, dK]": lambda: [_cholesky_qr2(A) for A in As],
            **_svd_variants(Ss, device, here),
            "svd: one batched torch.linalg.svd, zero-padded": lambda: torch.linalg.svd(Ss_pad),
            "svd: loop torch.linalg.svdvals": lambda: [torch.linalg.svdvals(S) for S in Ss],
            "svd: batched eigh(S S^T), zero-padded": lambda: torch.linalg.eigh(Ss_pad @ Ss_pad.mT),
        }
        if device.type == "cuda":  # small factorisations may be cheaper on the host, copies included
            variants["svd: loop on the CPU, copies included"] = lambda: [
                [t.to(device) for t in torch.linalg.svd(S.cpu())] for S in Ss]
            variants["svd: on the host, one copy each way, 1 thread, gram_svd"] = lambda: ig.svds_on_host(Ss, ig.gram_svd)
            variants["qr: loop on the CPU, copies included"] = lambda: [
                [t.to(device) for t in torch.linalg.qr(A.cpu())] for A in As]
        fields = {"case": case.name, "qr_shapes": " ".join(f"{n}x{2 * r}" for n, r, _ in factors),
                  "svd_sizes": " ".join(str(k) for k in cores)}
        rows += _time_variants(variants, args.linalg_reps, sync, {**fields, **meta.fields})
    for rank in (4,) if args.quick else CORE_RANKS if device.type == "cuda" else CORE_RANKS[:2]:
        wait_for_idle(args.wait_idle)
        Ss = _test_cores([2 * rank] * 4, g, device)
        fields = {"case": f"timing_study_r{rank}", "qr_shapes": "", "svd_sizes": " ".join(str(S.shape[0]) for S in Ss)}
        rows += _time_variants(_svd_variants(Ss, device, here), min(args.linalg_reps, 5), sync,
                               {**fields, **meta.fields})
    return rows


def _svd_variants(Ss: list[torch.Tensor], device, here: dict) -> dict:
    """Ways to get the SVD of each core: what this device runs now, and the candidates."""
    on_cpu = device.type == "cpu"
    variants = {
        f"svd: loop torch.linalg.svd{here[not on_cpu]}": lambda: [ig.svd(S) for S in Ss],
        f"svd: loop gram_svd (float64 eigh of S S^T){here[on_cpu]}": lambda: [ig.gram_svd(S) for S in Ss],
        "svd: loop eigh(S S^T)": lambda: [torch.linalg.eigh(S @ S.mT) for S in Ss],
    }
    if device.type == "cuda":  # cuSOLVER's drivers by name; torch's default checks gesvdj's convergence on the host
        variants["svd: loop torch.linalg.svd(driver='gesvdj')"] = lambda: [
            torch.linalg.svd(S, driver="gesvdj") for S in Ss]
        variants["svd: loop torch.linalg.svd(driver='gesvd')"] = lambda: [
            torch.linalg.svd(S, driver="gesvd") for S in Ss]
        if max(S.shape[0] for S in Ss) <= 512:  # one thread would take seconds on the larger cores
            variants["svd: on the host, one copy each way, 1 thread"] = lambda: ig.svds_on_host(Ss, ig.svd)
    return variants


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[io.TextIOBase | io.BufferedIOBase], None], binary=False) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", newline=None if binary else "") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fmt(value):
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return value


def write_csv(path: str, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})

    _atomic_write(path, write)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(_fmt(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def plot_timing_study(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    trained = [m for m in (*TIMING_METHODS, "adaptive_graphed") if any(r["method"] == m for r in rows)]
    for ax, phase, methods in ((axes[0], "train", trained), (axes[1], "infer", ("low_rank",))):
        failures = []
        for method, marker in zip(methods, ("o", "s", "^")):
            mine = [r for r in rows if r["method"] == method and r["phase"] == phase]
            pts = sorted((r["rank"], r["median_ms"]) for r in mine if r["median_ms"] == r["median_ms"])
            failures += [f"{method} r={r['rank']}: {r['error'].split(': ', 1)[-1][:70]}" for r in mine if r.get("error")]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"DLRT {method}")
        if failures:
            ax.text(0.02, 0.98, "failed: " + "; ".join(failures), transform=ax.transAxes, va="top", fontsize=7,
                    color="crimson")
        dense = [r["median_ms"] for r in rows if r["method"] == "dense" and r["phase"] == phase]
        if dense:
            ax.axhline(dense[0], color="k", linestyle="--", label="dense")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in rows if r["rank"] != ""})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("rank r (each low-rank layer)")
        ax.set_ylabel("ms per batch (median)")
        ax.set_title("training step" if phase == "train" else "inference pass")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 5,10,20, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be integers >= 1, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dlrt-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="all",
                   help=f"comma-separated subset of {','.join(SUITES)}, or 'all'")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join("results", "bench"), help="folder for the CSVs and the plot")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (for tests; numbers are not meaningful)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per method (steps suite) [100]")
    p.add_argument("--infer-steps", type=int, default=None, help="timed inference passes per method [100]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per runner first [10]")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds the timed steps are split into [10]")
    p.add_argument("--min-steps", type=int, default=None, help="timed steps a runner takes at least [3]")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per runner and phase, steps suite [30]")
    p.add_argument("--ranks", type=_int_list, default=None,
                   help=f"timing-study ranks [CUDA: {','.join(map(str, PAPER_TIMING_RANKS))}; "
                        f"CPU: {','.join(map(str, CPU_TIMING_RANKS))}]")
    p.add_argument("--width", type=int, default=None, help="timing-study layer width [5120]")
    p.add_argument("--ts-batch", type=int, default=None, help="timing-study batch [500]")
    p.add_argument("--ts-steps", type=int, default=None, help="timing-study timed steps per method and rank [10]")
    p.add_argument("--ts-warmup", type=int, default=None, help="timing-study untimed steps first [2]")
    p.add_argument("--ts-max-seconds", type=float, default=None, help="timing-study budget per runner and phase [15]")
    p.add_argument("--breakdown-steps", type=int, default=None, help="steps timed part by part [50]")
    p.add_argument("--linalg-reps", type=int, default=None, help="repetitions per linalg variant [50]")
    p.add_argument("--batches", type=int, default=None,
                   help="distinct synthetic batches per case, cycled (timing study: a 1/8 of it) [64]")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.set_flush_denormal(True) while timing (CPU): subnormal floats are slow on x86 "
                        "and say nothing about the method")
    p.add_argument("--graphs", choices=("with", "without", "only"), default="with",
                   help="CUDA only: time adaptive_graphed (CUDA graphs) beside the other methods, not at all, or "
                        "alone with dense (a capture that fails can leave the GPU unusable for the rest of the "
                        "process: gpu_checks.sh measures the graphed steps in a process of their own)")
    p.add_argument("--svd-on", choices=SVD_PLACES, default="auto",
                   help="where the rank-adaptive steps take the SVDs of their cores (DLRTOptimizer's svd_on)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each case wait up to this many seconds for other processes to leave the CPU")
    args = p.parse_args(argv)

    quick = args.quick
    defaults = {
        "steps": (3, 100), "infer_steps": (3, 100), "warmup": (1, 10), "rounds": (1, 10), "min_steps": (1, 3),
        "max_seconds": (5.0, 30.0), "width": (64, 5120), "ts_batch": (16, 500), "ts_steps": (2, 10),
        "ts_warmup": (1, 2), "ts_max_seconds": (5.0, 15.0), "breakdown_steps": (2, 50), "linalg_reps": (2, 50), "batches": (4, 64),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    suites = SUITES if args.suite == "all" else tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}: choose from {', '.join(SUITES)} or 'all'")
    args.suites = suites
    return args


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    prog = "dlrt-bench" if argv is None and os.path.basename(sys.argv[0]) == "dlrt-bench" else "python -m dlrt.bench"
    args = parse_args(args_list)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, args_list, prog)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called inside a longer-lived process


CONTENDED_PCT = 10.0  # other processes' share of the CPUs above which a CPU timing is flagged


def _contention_warning(rows: list[dict], device: torch.device, say) -> None:
    shares = [v for v in (r.get("others_cpu_pct", float("nan")) for r in rows) if v == v]
    worst = max(shares, default=0.0)
    if device.type != "cpu" or worst <= CONTENDED_PCT:
        return
    if torch.get_num_threads() > 1:
        advice = (f"With {torch.get_num_threads()} threads a stolen core stalls every multi-threaded kernel: "
                  "wall times, CPU times and even ratios are unreliable. Rerun on a quiet machine "
                  "(--wait-idle 600) or with --threads 1 and read the cpu_ms columns.")
    else:
        advice = ("With 1 thread the wall times include the turns other processes took; the cpu_ms columns "
                  "(this process's CPU time) are the robust measure of the work.")
    say(f"WARNING: other processes used up to {worst:.0f}% of the CPUs while this was timed "
        f"(column others_cpu_pct). {advice}")


def _report_errors(rows: list[dict], say) -> None:
    seen = set()
    for r in rows:
        key = (r.get("case", r.get("rank")), r["method"], r.get("error"))
        if r.get("error") and key not in seen:
            seen.add(key)
            where = r.get("case") or f"rank {r.get('rank')}"
            say(f"FAILED: {where} {r['method']}: {r['error']}")


def _run(args, args_list, prog) -> int:
    device = resolve_device(args.device)
    flushing = bool(args.flush_denormal) and torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        return _run_suites(args, args_list, prog, device, flushing)
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _run_suites(args, args_list, prog, device, flushing) -> int:
    meta = Meta(device, shlex.join([prog, *args_list]), flushing)
    if args.ranks is None:
        args.ranks = list(QUICK_TIMING_RANKS if args.quick else
                          PAPER_TIMING_RANKS if device.type == "cuda" else CPU_TIMING_RANKS)
        ranks_note = ("default for " + ("--quick" if args.quick else device.type) +
                      ("" if device.type == "cuda" or args.quick else
                       "; the paper's 1280 and 2560 are left out on CPU (minutes per step): pass --ranks to add them"))
    else:
        ranks_note = "from --ranks"

    out = args.out
    header: list[str] = []
    report = header  # what say() writes goes to stdout and to <suite>.txt beside <suite>.csv

    def say(text=""):
        print(text, flush=True)
        report.append(text)

    def section(suite: str) -> None:
        nonlocal report
        report = list(header)

    def save(suite: str) -> None:
        _atomic_write(os.path.join(out, f"{suite}.txt"), lambda f: f.write("\n".join(report) + "\n"))

    say(f"dlrt-bench on {meta.fields['device_name']} [{device}], torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {meta.fields['date']}")
    say(f"command: {meta.fields['command']} (code {meta.fields['code_version']})")
    if args.quick:
        say("--quick: tiny sizes and few steps; the numbers below are not meaningful")

    if "steps" in args.suites:
        section("steps")
        rows = suite_steps(args, device, meta)
        write_csv(os.path.join(out, "steps.csv"), rows)
        say("\n== training step and inference, median ms (ratio = median / dense median) ==")
        for phase in ("train", "infer"):
            say(f"\n-- {phase} --")
            say(table([r for r in rows if r["phase"] == phase],
                      ["case", "method", "batch", "ranks_start", "ranks_end", "median_ms", "p25_ms", "p75_ms",
                       "ratio_to_dense", "cpu_ms", "cpu_ratio_to_dense", "n", "others_cpu_pct"]))
        _contention_warning(rows, device, say)
        _report_errors(rows, say)
        save("steps")

    if "timing_study" in args.suites:
        section("timing_study")
        rows = suite_timing_study(args, device, meta)
        write_csv(os.path.join(out, "timing_study.csv"), rows)
        say(f"\n== timing study: 784-{args.width}x4-10, batch {args.ts_batch}, SGD; ranks {args.ranks} ({ranks_note}) ==")
        say(table(rows, ["method", "phase", "rank", "layer_ranks", "median_ms", "p25_ms", "p75_ms",
                         "ratio_to_dense", "cpu_ms", "cpu_ratio_to_dense", "n", "others_cpu_pct"]))
        measured = [m for m in (*TIMING_METHODS, "adaptive_graphed") if any(r["method"] == m for r in rows)]
        for method, phase in [*((m, "train") for m in measured), ("low_rank", "infer")]:
            say(f"crossover ({method}, {phase}): wall {crossover(rows, method, phase)}; "
                f"cpu time {crossover(rows, method, phase, 'cpu_ratio_to_dense')}")
        _contention_warning(rows, device, say)
        _report_errors(rows, say)
        plot_timing_study(rows, os.path.join(out, "timing_study.png"),
                          f"784-{args.width}x4-10, batch {args.ts_batch}, {meta.fields['device_name']}, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        save("timing_study")

    if "breakdown" in args.suites:
        section("breakdown")
        rows = suite_breakdown(args, device, meta)
        write_csv(os.path.join(out, "breakdown.csv"), rows)
        say("\n== where a step's time goes (mean ms per step; % of the step) ==")
        for key in dict.fromkeys((r["case"], r["method"]) for r in rows):
            part_rows = [r for r in rows if (r["case"], r["method"]) == key]
            say(f"\n-- {key[0]} {key[1]} (ranks {part_rows[0].get('ranks_start', '')} -> {part_rows[0].get('ranks_end', '')}) --")
            say(table(part_rows, ["part", "mean_ms", "median_ms", "pct", "mean_cpu_ms", "pct_cpu", "calls_per_step"]))
        _contention_warning(rows, device, say)
        _report_errors(rows, say)
        save("breakdown")

    if "linalg" in args.suites:
        section("linalg")
        rows = suite_linalg(args, device, meta)
        write_csv(os.path.join(out, "linalg.csv"), rows)
        say("\n== one adaptive step's QR and SVD calls at the real shapes (median ms for all layers) ==")
        for case in dict.fromkeys(r["case"] for r in rows):
            case_rows = [r for r in rows if r["case"] == case]
            shapes = case_rows[0].get("qr_shapes") and f"QR inputs {case_rows[0]['qr_shapes']}; "
            say(f"\n-- {case}: {shapes or ''}SVD cores {case_rows[0].get('svd_sizes', '')} --")
            say(table(case_rows, ["variant", "median_ms", "p25_ms", "p75_ms", "cpu_ms", "others_cpu_pct", "note"]))
        _contention_warning(rows, device, say)
        save("linalg")

    written = [f"{s}.csv, {s}.txt" for s in args.suites] + (["timing_study.png"] if "timing_study" in args.suites else [])
    print(f"\nwrote {', '.join(written)} to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
