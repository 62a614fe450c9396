"""How the bench times: steps timed one by one in interleaved rounds, the share of the CPU that other processes
took meanwhile, and the quantiles reported."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import time
from collections import defaultdict
from typing import Callable

import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: torch.cuda.synchronize on CUDA, nothing on a CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def no_gc():
    """Python's garbage collector off (after one collection) while timing."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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


def time_runners(runners: list, batches, device, *, phase: str, warmup: int, steps: int,
                 rounds: int, min_steps: int, max_seconds: float, progress=None) -> None:
    """Warm every runner (cases.Runner) up, then time `steps` steps each in `rounds` interleaved rounds, every step
    on its own (synchronised on CUDA), in wall time and in this process's CPU time.

    A runner stops early (after at least `min_steps`) once it has spent `max_seconds` timing. A runner whose step
    raises gets the error in `runner.error` and is left out; the others go on.
    """
    sync = device_sync(device)
    eval_x = batches[0][0]

    def one(runner, index: int) -> tuple[float, float]:
        x, y = batches[index % len(batches)]
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        if phase == "train":
            runner.step(x, y)
        else:
            runner.infer(eval_x)
        sync()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    def failed(runner, error: Exception) -> None:
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
    budget_spent = lambda runner: counts[runner.name] >= min_steps and spent[runner.name] >= max_seconds * 1e3
    with no_gc():
        while any(counts[r.name] < steps for r in runners):
            for runner in runners:
                if counts[runner.name] >= steps or runner.error or budget_spent(runner):
                    counts[runner.name] = steps  # done
                    continue
                runner.cpu_share.start()
                for _ in range(min(per_round, steps - counts[runner.name])):
                    if budget_spent(runner):
                        break  # within the round: the check above ends this runner
                    try:
                        wall, cpu = one(runner, counts[runner.name])
                    except Exception as error:
                        failed(runner, error)
                        break
                    counts[runner.name] += 1
                    spent[runner.name] += wall
                    if phase == "train":
                        wall, cpu = wall / runner.steps_per_call, cpu / runner.steps_per_call
                        runner.train_ms.append(wall)
                        runner.train_cpu_ms.append(cpu)
                        runner.ranks_seen.append(tuple(runner.ranks()))
                    else:
                        runner.infer_ms.append(wall)
                        runner.infer_cpu_ms.append(cpu)
                    if progress is not None:
                        progress.update(1)
                runner.cpu_share.stop()


def quantile(values, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values) -> dict:
    return {
        "median_ms": quantile(values, 0.5),
        "p25_ms": quantile(values, 0.25),
        "p75_ms": quantile(values, 0.75),
        "min_ms": min(values) if values else float("nan"),
        "n": len(values),
    }


def cpu_columns(cpu_ms: list, dense_cpu_median: float) -> dict:
    """Median process CPU time per step and its ratio to dense: with --threads 1 this is the work done,
    robust to other processes taking turns on the cores (with more threads it also counts spin-waits)."""
    median = quantile(cpu_ms, 0.5)
    return {"cpu_ms": median, "cpu_ratio_to_dense": median / dense_cpu_median}


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr that disappears when done."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
