"""The breakdown suite: where a training step of LeNet5 and of the FC net spends its time, dense and adaptive.

zero_grad, forward + loss, backward and opt.step are timed around the calls (synchronised on CUDA), in wall time and
in this process's CPU time. Inside opt.step the parts of a DLRT step carry torch.profiler labels ("dlrt::qr",
"dlrt::svd", ...: dlrt.functional.PARTS); the timed steps run under torch.profiler and each label's time per step is
read from the profile. step_other is opt.step minus its labelled parts (Python, small tensor operations between
them). The profiler adds a few microseconds to every operation, in every part: the steps suite has the unprofiled
totals.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from dlrt.functional import PARTS
from dlrt.optim import DLRTOptimizer

from .cases import Case, make_runner, step_cases, synthetic_batches
from .output import Meta, ranks_str, table
from .timing import CpuShare, device_sync, no_gc, progress_bar, quantile, wait_for_idle

LABEL_PREFIX = "dlrt::"
STEP_PARTS = PARTS  # the labelled parts of DLRTOptimizer.step, in the order the tables list them
STEP_LABEL = "bench::opt.step"  # the label the suite puts around each timed opt.step


class _Timer:
    """Wall and process CPU time (ms) of a block, synchronised with the device before and after."""

    def __init__(self, sync):
        self.sync = sync
        self.ms: dict[str, float] = {}
        self.cpu_ms: dict[str, float] = {}

    def measure(self, name: str, fn):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        self.sync()
        self.ms[name] = (time.perf_counter() - t0) * 1e3
        self.cpu_ms[name] = (time.process_time() - c0) * 1e3
        return result


def labelled_parts(events) -> list[dict[str, list]]:
    """For each STEP_LABEL range of a profile, in order: {part: [host ms, device ms, label ranges]} of the dlrt::
    labels inside it. A label inside another counts for the outer one."""
    cpu = torch.autograd.DeviceType.CPU
    steps = sorted((e for e in events if e.name == STEP_LABEL and e.device_type == cpu),
                   key=lambda e: e.time_range.start)
    found = []
    for step in steps:
        parts = defaultdict(lambda: [0.0, 0.0, 0])
        stack = list(step.cpu_children)
        while stack:
            event = stack.pop()
            if event.name.startswith(LABEL_PREFIX):
                entry = parts[event.name[len(LABEL_PREFIX):]]
                entry[0] += event.time_range.elapsed_us() / 1e3
                entry[1] += event.device_time_total / 1e3  # the GPU kernels launched inside it (0 on a CPU)
                entry[2] += 1
            else:
                stack.extend(event.cpu_children)
        found.append(dict(parts))
    return found


def _profiled_steps(runner, batches, steps: int, device: torch.device):
    """`steps` training steps timed part by part under torch.profiler: per step the around-call timer, and the
    labelled parts of its opt.step."""
    model, opt = runner.model, runner.opt
    timers = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with no_gc(), profile(activities=activities) as prof:
        runner.step(*batches[0])  # the profiler's own start-up costs fall on an untimed step
        for i in range(steps):
            x, y = batches[i % len(batches)]
            timer = _Timer(device_sync(device))
            timer.measure("zero_grad", opt.zero_grad)
            loss = timer.measure("forward+loss", lambda: F.cross_entropy(model(x), y))
            timer.measure("backward", loss.backward)

            def step():
                with record_function(STEP_LABEL):
                    opt.step()

            timer.measure("opt.step", step)
            timers.append(timer)
    parts = labelled_parts(prof.events())
    if len(parts) != steps:
        raise RuntimeError(f"the profile holds {len(parts)} labelled steps, not {steps}")
    return timers, parts


def breakdown_rows(case: Case, method: str, device, args, meta: Meta) -> list[dict]:
    runner = make_runner(method, case, device, svd_on=args.svd_on)
    batches = synthetic_batches(case, device, args.batches)
    for i in range(args.warmup):
        runner.step(*batches[i % len(batches)])
    ranks_start = runner.ranks()
    share = CpuShare()
    timers, labelled = _profiled_steps(runner, batches, args.breakdown_steps, device)
    others = share.others_pct()
    per_step = []  # (wall ms, calls, cpu ms, device ms) by part
    for timer, parts in zip(timers, labelled):
        ms, cpu = dict(timer.ms), dict(timer.cpu_ms)
        calls, device_ms = {name: 1 for name in ms}, {}
        if isinstance(runner.opt, DLRTOptimizer):  # opt.step as its labelled parts and the rest
            step_ms, step_cpu = ms.pop("opt.step"), cpu.pop("opt.step")
            calls.pop("opt.step")
            cpu_per_ms = step_cpu / step_ms if step_ms > 0 else 0.0  # the step's CPU time shared out by wall time
            for name, (wall, on_device, count) in parts.items():
                ms[name], cpu[name], calls[name], device_ms[name] = wall, wall * cpu_per_ms, count, on_device
            ms["step_other"] = step_ms - sum(wall for wall, _, _ in parts.values())
            cpu["step_other"] = ms["step_other"] * cpu_per_ms
            calls["step_other"] = 1
        per_step.append((ms, calls, cpu, device_ms))
    found = {name for ms, _, _, _ in per_step for name in ms}
    labels = [*STEP_PARTS, *sorted(found - {*STEP_PARTS, "zero_grad", "forward+loss", "backward", "opt.step",
                                            "step_other"})]
    names = ["zero_grad", "forward+loss", "backward"] + [p for p in ("opt.step", *labels, "step_other") if p in found]
    mean = {p: statistics.fmean(ms.get(p, 0.0) for ms, _, _, _ in per_step) for p in names}
    mean_cpu = {p: statistics.fmean(cpu.get(p, 0.0) for _, _, cpu, _ in per_step) for p in names}
    total, total_cpu = sum(mean.values()), sum(mean_cpu.values())
    on_cuda = device.type == "cuda"
    note = "timed under torch.profiler, which adds a few microseconds to every operation"
    if isinstance(runner.opt, DLRTOptimizer):
        note += "; opt.step's parts from its dlrt:: labels, their cpu_ms its CPU time shared out by wall time"
    if on_cuda:
        note += "; the parts around calls synced, the labels in host time; mean_device_ms: their kernels' GPU time"
    rows = []
    for p in names + ["total"]:
        values = [sum(ms.values()) if p == "total" else ms.get(p, 0.0) for ms, _, _, _ in per_step]
        calls = 0 if p == "total" else statistics.fmean(c.get(p, 0) for _, c, _, _ in per_step)
        cpu = total_cpu if p == "total" else mean_cpu[p]
        rows.append({
            "suite": "breakdown", "case": case.name, "model": case.model, "method": method,
            "part": p, "mean_ms": statistics.fmean(values), "median_ms": quantile(values, 0.5),
            "pct": 100.0 * (total if p == "total" else mean[p]) / total, "calls_per_step": calls,
            "mean_cpu_ms": cpu, "pct_cpu": 100.0 * cpu / total_cpu if total_cpu > 0 else float("nan"),
            **({"mean_device_ms": statistics.fmean(d.get(p, 0.0) for _, _, _, d in per_step)} if on_cuda else {}),
            "n": len(per_step), "batch": case.batch, "ranks_start": ranks_str(ranks_start),
            "ranks_end": ranks_str(runner.ranks()), "tau": case.tau if method != "dense" else "",
            "optimizer": case.optimizer, "others_cpu_pct": others, "note": note, **meta.fields,
        })
    return rows


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    rows = []
    jobs = [(case, m) for case in step_cases(args.quick)[:2] for m in ("dense", "adaptive")]
    with progress_bar(len(jobs), "breakdown") as bar:
        for case, method in jobs:
            wait_for_idle(args.wait_idle)
            try:
                rows += breakdown_rows(case, method, device, args, meta)
            except Exception as error:  # keep the other cases' parts
                print(f"\nbreakdown {case.name} {method}: {type(error).__name__}: {error}", file=sys.stderr)
                rows.append({"suite": "breakdown", "case": case.name, "model": case.model, "method": method,
                             "part": "total", "mean_ms": float("nan"),
                             "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}", **meta.fields})
            bar.update(1)
    return rows


def report(rows: list[dict], args, meta: Meta, say) -> None:
    say("\n== where a step's time goes (mean ms per step; % of the step) ==")
    for key in dict.fromkeys((r["case"], r["method"]) for r in rows):
        part_rows = [r for r in rows if (r["case"], r["method"]) == key]
        columns = ["part", "mean_ms", "median_ms", "pct", "mean_cpu_ms", "pct_cpu", "calls_per_step"]
        if "mean_device_ms" in part_rows[0]:
            columns.insert(5, "mean_device_ms")
        say(f"\n-- {key[0]} {key[1]} (ranks {part_rows[0].get('ranks_start', '')} -> "
            f"{part_rows[0].get('ranks_end', '')}) --")
        say(table(part_rows, columns))
