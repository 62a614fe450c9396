"""The timing study of PAPER.md §3: the FC net 784-W x4-10 (W = 5120) at batch 500, every layer at a fixed rank r
(r_min = r_max = r), methods fixed and adaptive (on CUDA also adaptive_graphed), inference per rank, dense as the
reference; where each method stops being faster than dense (`crossover`), and a plot."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from dlrt.experiments.run_folder import atomic_write

from .cases import Runner, build, make_runner, synthetic_batches, timing_study_case, with_basis_every
from .output import Meta, ranks_str, table
from .timing import cpu_columns, progress_bar, quantile, summary, time_runners, wait_for_idle

TIMING_METHODS = ("fixed", "adaptive")
PAPER_TIMING_RANKS = (5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)
# On a 2-core CPU one adaptive step at r=1280 takes ~10 s (QR of 5120x2560, SVD of 2560x2560 per
# layer) and building the model minutes: the CPU default stops at 640, past the crossover.
CPU_TIMING_RANKS = (5, 10, 20, 40, 80, 160, 320, 640)
QUICK_TIMING_RANKS = (4, 8)


def timing_methods(device: torch.device, graphs: str = "with") -> list[str]:
    if device.type != "cuda" or graphs == "without":
        return list(TIMING_METHODS)
    return ["adaptive_graphed"] if graphs == "only" else [*TIMING_METHODS, "adaptive_graphed"]


def default_ranks(quick: bool, device: torch.device) -> tuple[list[int], str]:
    """The ranks timed when --ranks is not given, and a note that says why."""
    ranks = QUICK_TIMING_RANKS if quick else PAPER_TIMING_RANKS if device.type == "cuda" else CPU_TIMING_RANKS
    note = "default for " + ("--quick" if quick else device.type)
    if not quick and device.type != "cuda":
        note += "; the paper's 1280 and 2560 are left out on CPU (minutes per step): pass --ranks to add them"
    return list(ranks), note


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    width = args.width
    ranks = args.ranks
    case = timing_study_case(1, width, args.ts_batch)
    batches = synthetic_batches(case, device, max(2, args.batches // 8))
    timed = dict(warmup=args.ts_warmup, rounds=1, min_steps=args.min_steps, max_seconds=args.ts_max_seconds)
    methods = with_basis_every(timing_methods(device, args.graphs), args.basis_every)
    total = (1 + len(methods) * len(ranks)) * args.ts_steps + (1 + len(ranks)) * args.ts_steps
    rows = []
    with progress_bar(total, "timing study") as bar:
        waited = wait_for_idle(args.wait_idle)
        dense = make_runner("dense", case, device)
        time_runners([dense], batches, device, phase="train", steps=args.ts_steps, progress=bar, **timed)
        time_runners([dense], batches, device, phase="infer", steps=args.ts_steps, progress=bar, **timed)
        ref = {ph: summary(getattr(dense, f"{ph}_ms"))["median_ms"] for ph in ("train", "infer")}
        ref_cpu = {ph: quantile(getattr(dense, f"{ph}_cpu_ms"), 0.5) for ph in ("train", "infer")}

        def row(method, phase, runner, rank, actual, waited):
            stats = summary(getattr(runner, f"{phase}_ms"))
            return {"suite": "timing_study", "width": width, "rank": rank, "layer_ranks": ranks_str(actual),
                    "method": method, "phase": phase, "batch": case.batch, "optimizer": case.optimizer,
                    "lr": case.lr, **stats, "ratio_to_dense": stats["median_ms"] / ref[phase],
                    **cpu_columns(getattr(runner, f"{phase}_cpu_ms"), ref_cpu[phase]),
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
                if runner.name.startswith("adaptive_graphed") and runner.error:  # a capture that failed once
                    methods.remove(runner.name)                                # fails at every rank: no retry
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


def _trained_methods(rows: list[dict]) -> list[str]:
    """Every low-rank method trained, basis_every variants (adaptive_k10) included, in the order first timed."""
    return list(dict.fromkeys(r["method"] for r in rows if r["phase"] == "train" and r["method"] != "dense"))


def report(rows: list[dict], args, meta: Meta, say) -> None:
    say(f"\n== timing study: 784-{args.width}x4-10, batch {args.ts_batch}, SGD; ranks {args.ranks} "
        f"({args.ranks_note}) ==")
    say(table(rows, ["method", "phase", "rank", "layer_ranks", "median_ms", "p25_ms", "p75_ms",
                     "ratio_to_dense", "cpu_ms", "cpu_ratio_to_dense", "n", "others_cpu_pct"]))
    for method, phase in [*((m, "train") for m in _trained_methods(rows)), ("low_rank", "infer")]:
        say(f"crossover ({method}, {phase}): wall {crossover(rows, method, phase)}; "
            f"cpu time {crossover(rows, method, phase, 'cpu_ratio_to_dense')}")
    plot(rows, Path(args.out) / "timing_study.png",
         f"784-{args.width}x4-10, batch {args.ts_batch}, {meta.fields['device_name']}, "
         f"torch {meta.fields['torch']}, {meta.fields['threads']} threads")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, phase, methods in ((axes[0], "train", _trained_methods(rows)), (axes[1], "infer", ("low_rank",))):
        failures = []
        for method, marker in zip(methods, itertools.cycle(("o", "s", "^", "v", "D"))):
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
