"""Figures and summary.csv from the timeline_*.csv and truncations_*.csv that diagnose.py writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarise(name: str, timeline: list[dict], cuts: list[dict]) -> dict:
    """The epoch-end accuracies, and what the truncations of the last epoch dropped."""
    ends = [row for row in timeline if row["epoch_end"] == 1]
    last_epoch = max(int(row["epoch"] - 1e-9) for row in cuts) if cuts else 0
    late = [c for c in cuts if int(c["epoch"] - 1e-9) == last_epoch]  # the last epoch's truncations
    layers = sorted({int(c["layer"]) for c in cuts})
    events = {c["step"]: c for c in late}.values()  # one probe jump per truncation event, not per layer
    row = {"run": name}
    for i, end in enumerate(ends, 1):
        row.update({f"ep{i}_untrunc_acc": end["untrunc_acc"], f"ep{i}_trunc_acc": end["trunc_acc"],
                    f"ep{i}_settled_acc": end["settled_acc"], f"ep{i}_trunc_ranks": end["trunc_ranks"],
                    f"ep{i}_train_loss_window": end["train_loss_window"]})
    row["last_epoch_mean_untrunc_acc"] = mean(r["untrunc_acc"] for r in timeline
                                              if int(r["epoch"] - 1e-9) == last_epoch and not r["epoch_end"])
    row["last_epoch_mean_trunc_acc"] = mean(r["trunc_acc"] for r in timeline
                                            if int(r["epoch"] - 1e-9) == last_epoch and not r["epoch_end"])
    for layer in layers:
        mine = [c for c in late if int(c["layer"]) == layer]
        row[f"layer{layer}_tail_frac"] = mean(c["tail_frac"] for c in mine)
        row[f"layer{layer}_size_kept"] = f"{mean(c['size'] for c in mine):.1f}->{mean(c['kept'] for c in mine):.2f}"
    row["probe_loss_jump"] = mean(c["probe_loss_after"] - c["probe_loss_before"] for c in events)
    row["probe_loss_before"] = mean(c["probe_loss_before"] for c in events)
    row["truncations_last_epoch"] = len(events)
    row["seconds"] = timeline[-1]["seconds"]
    return row


def plot_all(folder: Path) -> None:
    names = sorted(p.name[len("timeline_"):-4] for p in folder.glob("timeline_*.csv"))
    runs = {n: (read(folder / f"timeline_{n}.csv"), read(folder / f"truncations_{n}.csv")) for n in names}
    rows = [summarise(n, *runs[n]) for n in names]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.2 * len(names)), squeeze=False)
    for (left, right), name in zip(axes, names):
        timeline, cuts = runs[name]
        t = [r for r in timeline if not r["epoch_end"]]
        x = [r["epoch"] for r in t]
        for key, label in (("untrunc_acc", "as trained"), ("trunc_acc", "truncated copy"),
                           ("settled_acc", "truncated + 10 S-steps"), ("aug_acc", "k=1: before its truncation")):
            if any(not math.isnan(r[key]) for r in t):
                left.plot(x, [r[key] for r in t], marker=".", label=label)
        left.set_title(f"{name}: test acc (2000 images)")
        left.set_ylim(max(0, min(r["trunc_acc"] for r in t[2:]) - 5) if len(t) > 2 else 0, 100)
        left.set_xlabel("epoch")
        left.legend(fontsize=7)
        for layer in sorted({int(c["layer"]) for c in cuts}):
            mine = [c for c in cuts if int(c["layer"]) == layer]
            right.plot([c["epoch"] for c in mine], [c["tail_frac"] for c in mine], ".", ms=2, label=f"layer {layer}")
        right.set_title(f"{name}: ‖σ_tail‖/‖σ‖ dropped per truncation")
        right.set_yscale("log")
        right.set_ylim(1e-5, 1)
        right.set_xlabel("epoch")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "timelines.png", dpi=90)
    plt.close(fig)

    fig, (by_batch, by_basis) = plt.subplots(1, 2, figsize=(12, 4))
    for name in names:
        config = json.loads((folder / f"config_{name}.json").read_text())
        k = config["k"] if config["variant"] in ("library", "inner_tau", "cut_at_once") else 1
        t = [r for r in runs[name][0] if not r["epoch_end"]]
        by_batch.plot([r["step"] for r in t], [r["trunc_acc"] for r in t], marker=".", label=name)
        switch = (config["epochs"] - config.get("final_k1_epochs", 0)) * 391 if k > 1 else 0  # 391 batches an epoch
        basis_steps = [math.ceil(min(r["step"], switch) / k) + max(0, r["step"] - switch) for r in t]
        by_basis.plot(basis_steps, [r["trunc_acc"] for r in t], marker=".", label=name)
    by_batch.set_title("test acc of the truncated model against batches")
    by_basis.set_title("... against basis steps taken")
    for ax in (by_batch, by_basis):
        ax.set_ylim(40, 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "progress.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        events = list({c["step"]: c for c in runs[name][1]}.values())[5:]  # past the first, large-rank steps
        ax.plot([c["epoch"] for c in events], [c["probe_loss_after"] - c["probe_loss_before"] for c in events],
                ".", ms=2, label=name)
    ax.set_title("probe loss (512 training images) after - before each truncation")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss_jumps.png", dpi=90)
    plt.close(fig)
