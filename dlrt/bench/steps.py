"""The steps suite: a training step and an inference pass of each method against dense, at the paper's ranks.

Cases (cases.step_cases): LeNet5 at the paper's ϑ = 0.15 ranks, the FC net 784-500x4-10 at its ϑ = 0.09 ranks and at
rank 40. Methods: dense (plain nn layers + torch.optim's default, the reference of every ratio), dense_fused (the
same with torch's opt-in fused optimizer kernel: the fastest dense step torch offers), adaptive, adaptive_pinned,
parallel, fixed, vanilla; on CUDA also adaptive_graphed (adaptive_pinned replayed from CUDA graphs, dlrt.graphs).
"""

from __future__ import annotations

import os

import torch

from .cases import build, imagenet_case, make_runner, step_cases, synthetic_batches, with_basis_every
from .output import Meta, ranks_str, table
from .timing import cpu_columns, progress_bar, quantile, summary, time_runners, wait_for_idle

STEP_METHODS = ("dense", "dense_fused", "adaptive", "adaptive_pinned", "parallel", "fixed", "vanilla")
CUDA_STEP_METHODS = STEP_METHODS + ("adaptive_graphed",)


def step_methods(device: torch.device, graphs: str = "with") -> tuple[str, ...]:
    """The methods timed; dense first (the reference of every ratio)."""
    if device.type != "cuda" or graphs == "without":
        return STEP_METHODS
    return ("dense", "adaptive_graphed") if graphs == "only" else CUDA_STEP_METHODS


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    rows = []
    cases = step_cases(args.quick) + ([imagenet_case(args.imagenet_batch)] if args.imagenet_batch else [])
    methods_of = lambda case: with_basis_every(case.methods or step_methods(device, args.graphs), args.basis_every)
    total = sum(len(methods_of(case)) for case in cases) * (args.steps + args.infer_steps)
    with progress_bar(total, "steps") as bar:
        for case in cases:
            methods = methods_of(case)
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
            dense_cpu = {ph: quantile(getattr(runners[0], f"{ph}_cpu_ms"), 0.5) for ph in ("train", "infer")}
            for runner in runners:
                is_dense = runner.name.startswith("dense")
                changed = len(set(runner.ranks_seen)) > 1 or (runner.ranks_seen and
                                                              list(runner.ranks_seen[0]) != ranks_start[runner.name])
                for phase in ("train", "infer"):
                    stats = summary(getattr(runner, f"{phase}_ms"))
                    rows.append({
                        "suite": "steps", "case": case.name, "model": case.model, "method": runner.name,
                        "phase": phase, "batch": case.batch,
                        "ranks_start": ranks_str(ranks_start[runner.name]),
                        "ranks_end": ranks_str(runner.ranks()),
                        "ranks_changed": "" if is_dense else bool(changed),
                        "tau": "" if is_dense else case.tau, "optimizer": case.optimizer,
                        "lr": case.lr, **stats,
                        "ratio_to_dense": stats["median_ms"] / dense[phase],
                        **cpu_columns(getattr(runner, f"{phase}_cpu_ms"), dense_cpu[phase]),
                        "others_cpu_pct": runner.cpu_share.others_pct(), "loadavg_1m": load,
                        "waited_s": round(waited, 1), "error": runner.error, **meta.fields,
                    })
            del runners, base
    return rows


def report(rows: list[dict], args, meta: Meta, say) -> None:
    say("\n== training step and inference, median ms (ratio = median / dense median) ==")
    for phase in ("train", "infer"):
        say(f"\n-- {phase} --")
        say(table([r for r in rows if r["phase"] == phase],
                  ["case", "method", "batch", "ranks_start", "ranks_end", "median_ms", "p25_ms", "p75_ms",
                   "ratio_to_dense", "cpu_ms", "cpu_ratio_to_dense", "n", "others_cpu_pct"]))
