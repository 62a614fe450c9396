"""dlrt-bench --suite memory: the peak memory of a training step (dlrt.bench.memory), dense beside each DLRT method.

Cases: the paper's timing-study net (784 -> 5120 x4 -> 10, batch 500) at ranks 20..640, each layer pinned to its
rank (every step augments to 2r and truncates back); LeNet5 at the paper's ϑ = 0.15 ranks (batch 128); ResNet-50 and
VGG16 at ImageNet shapes at the runner's initial ranks (⌊min(n,m)/2⌋), batch 8 on a CPU and 128 on a GPU. Each with
SGD and with Adam. Writes memory.csv, memory.txt and memory.png (peak against rank beside dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer

from .cases import split_basis_every, with_basis_every
from .memory import PARTS, peak_step_memory

MIB = 2 ** 20
TIMING_STUDY_RANKS = (20, 80, 160, 320, 640)
QUICK_RANKS = (4, 8)
METHODS = ("dense", "adaptive", "fixed", "parallel")


@dataclass
class MemoryCase:
    name: str
    model: str
    options: dict
    input_shape: tuple
    classes: int
    batch: int
    rank: object  # None: the runner's initial ranks; an int: every layer pinned there; a list: one per layer
    methods: tuple = METHODS


def memory_cases(device: torch.device, quick: bool) -> list[MemoryCase]:
    from dlrt.experiments.protocols import LENET5_RANKS_AT_0_15

    if quick:  # the same code paths on tiny shapes, for the tests
        return [MemoryCase(f"timing_study_r{r}", "fc", {"width": 64}, (1, 8, 8), 10, 16, r) for r in QUICK_RANKS] + [
            MemoryCase("lenet5_t0.15", "lenet5", {}, (1, 28, 28), 10, 16, LENET5_RANKS_AT_0_15, ("dense", "adaptive"))]
    big_batch = 128 if device.type == "cuda" else 8
    return ([MemoryCase(f"timing_study_r{r}", "fc", {"width": 5120}, (1, 28, 28), 10, 500, r) for r in TIMING_STUDY_RANKS]
            + [MemoryCase("lenet5_t0.15", "lenet5", {}, (1, 28, 28), 10, 128, LENET5_RANKS_AT_0_15, ("dense", "adaptive")),
               MemoryCase("resnet50_imagenet", "resnet50", {}, (3, 224, 224), 1000, big_batch, None, ("dense", "adaptive")),
               MemoryCase("vgg16_imagenet", "vgg16", {}, (3, 224, 224), 1000, big_batch, None, ("dense", "adaptive"))])


def _step(case: MemoryCase, method: str, optimizer: str, device: torch.device):
    """(model, optimizer, one training step) of a case; the factors start from random factors (init="authors"):
    the values do not change the memory, and it skips the SVDs of large dense draws. A method at basis_every = k
    (adaptive_k10) measures its third step, a coefficient step: its basis step is the plain method's step."""
    from dlrt.experiments.models import build_model

    method, basis_every = split_basis_every(method)
    torch.manual_seed(0)
    low_rank = method != "dense"
    pinned = case.rank is not None  # at the case's ranks: every step augments to 2r and truncates back to r
    model = build_model(case.model, case.input_shape, case.classes, low_rank=low_rank,
                        rank=case.rank, init="authors" if low_rank else "svd", **case.options).to(device)
    if low_rank:
        opt = DLRTOptimizer(model, lr=1e-3, tau=0.0 if pinned else 0.1, method=method, optimizer=optimizer,
                            basis_every=basis_every)
        for layer in opt.layers if pinned else []:
            opt.set_rank_bounds(layer, layer.rank, layer.rank)
    else:
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((case.batch, *case.input_shape), generator=g).to(device)
    y = torch.randint(case.classes, (case.batch,), generator=g).to(device)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return model, opt, lambda: opt.step(closure)


def memory_rows(case: MemoryCase, method: str, optimizer: str, device: torch.device, fields: dict) -> dict:
    model, opt, step = _step(case, method, optimizer, device)
    measured = peak_step_memory(step, model, opt, warmup=2)
    row = {"suite": "memory", "case": case.name, "model": case.model, "method": method, "optimizer": optimizer,
           "rank": case.rank if isinstance(case.rank, int) else str(case.rank or "initial"), "batch": case.batch,
           "peak_mib": measured.peak / MIB,
           **{f"{part.replace(' ', '_')}_mib": measured.parts[part] / MIB for part in PARTS},
           "saved_total_mib": measured.saved_for_backward / MIB,
           "top_temporaries": "; ".join(f"{op} {size / MIB:.1f}" for op, size in measured.top_temporaries[:4]),
           **fields}
    del model, opt, step
    return row


def run(args, device, meta) -> list[dict]:
    rows = []
    cases = [case for case in memory_cases(device, args.quick)
             if not args.memory_cases or case.name.startswith(tuple(args.memory_cases))]
    for case in cases:
        for optimizer in ("sgd", "adam"):
            dense_peak = math.nan
            for method in with_basis_every(case.methods, args.basis_every):
                try:
                    row = memory_rows(case, method, optimizer, device, meta.fields)
                except (RuntimeError, MemoryError) as e:  # one case out of memory must not lose the others
                    row = {"suite": "memory", "case": case.name, "method": method, "optimizer": optimizer,
                           "error": " ".join(str(e).split())[:200], **meta.fields}
                if method == "dense":
                    dense_peak = row.get("peak_mib", math.nan)
                row["pct_of_dense"] = 100 * row.get("peak_mib", math.nan) / dense_peak
                rows.append(row)
                print(f"memory {case.name} {method} {optimizer}: peak {row.get('peak_mib', math.nan):.1f} MiB "
                      f"({row['pct_of_dense']:.1f} % of dense)", flush=True)
    return rows


COLUMNS = ["case", "method", "optimizer", "batch", "peak_mib", "pct_of_dense", "parameters_mib", "gradients_mib",
           "optimizer_state_mib", "saved_for_backward_mib", "temporaries_mib", "saved_total_mib", "top_temporaries"]


def report(rows: list[dict], args, meta, say) -> None:
    from pathlib import Path

    from .output import table

    say("Peak memory of one training step (after 2 warm-up steps), MiB, and what is live at the peak. On a CPU "
        "measured from the profiler's allocation events (exact for torch's allocator); on a GPU "
        "torch.cuda.max_memory_allocated. pct_of_dense: the peak against the dense step of the same case and "
        "optimizer. saved_total: all that the step's forwards saved for the backward, whenever it was live.")
    say(table([r for r in rows if "peak_mib" in r], COLUMNS))
    plot_memory(rows, Path(args.out) / "memory.png")


def plot_memory(rows: list[dict], path) -> None:
    """Peak memory of the timing-study step against rank, one panel per optimizer; dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlrt.experiments.run_folder import atomic_write

    study = [r for r in rows if r["case"].startswith("timing_study") and "peak_mib" in r]
    if not study:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, optimizer in zip(axes, ("sgd", "adam")):
        for method in METHODS:
            points = sorted((r["rank"], r["peak_mib"]) for r in study if r["method"] == method and r["optimizer"] == optimizer)
            if not points:
                continue
            ranks, peaks = zip(*points)
            if method == "dense":
                ax.axhline(peaks[0], color="black", linestyle=":", label="dense")
            else:
                ax.plot(ranks, peaks, marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="rank of every layer", title=f"{optimizer.upper()}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("peak memory of a training step (MiB)")
    figure.suptitle("Timing-study net 784-5120x4-10, batch 500: peak training-step memory against rank")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
