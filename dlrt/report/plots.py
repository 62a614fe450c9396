"""Figures beside the tables of dlrt.report.tables, as PNG files (matplotlib, Agg backend: no display needed).

    lenet5_rank_evolution.png         rank of each low-rank LeNet5 layer per epoch, one line per ϑ
    lenet5_accuracy_compression.png   test accuracy and compression rate against ϑ, ours and the paper's
    fc_accuracy_vs_params.png         test accuracy against honest eval parameters, FC widths 500 and 784
    dlrt_vs_uv.png, dlrt_vs_uv_authors.png
                                      test accuracy per epoch, DLRT against U V^T, one panel per spectrum, ours
                                      (mean ± std) and the paper's published runs (dashed, mean ± std)

Each figure is drawn from the tables' frames (and, for the rank evolution, the runs' epochs.csv); a figure
whose runs do not exist is skipped with a message on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dlrt.experiments.protocols import PAPER_LENET5_DENSE_ACC, SPECTRUM_LABELS  # noqa: E402
from dlrt.experiments.run_folder import atomic_write  # noqa: E402

LENET5_LAYERS = ("conv1 (20 × 25)", "conv2 (50 × 500)", "fc1 (500 × 800)")
UV_STYLES = {"fixed": ("DLRT", "tab:blue"), "vanilla": ("U V^T", "tab:red"),
             "vanilla_frozen_convs": ("U V^T, convs frozen", "tab:red")}
INIT_MARKERS = {"authors": ("o", "authors' init"), "svd": ("^", "svd init")}
FC_COLORS = {"fc500_mnist": "tab:blue", "fc784_mnist": "tab:orange"}


def make_plots(tables: dict[str, pd.DataFrame], runs: dict[str, list], out_dir: Path) -> list[Path]:
    """Draw every figure whose runs exist; tables: table name -> frame, runs: experiment -> completed runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "lenet5_rank_evolution.png": lambda: rank_evolution(runs.get("lenet5_mnist", [])),
        "lenet5_accuracy_compression.png": lambda: accuracy_compression(tables.get("lenet5_mnist")),
        "fc_accuracy_vs_params.png": lambda: fc_accuracy_vs_params(
            {name: tables[name] for name in FC_COLORS if name in tables}),
        "dlrt_vs_uv.png": lambda: dlrt_vs_uv(tables.get("dlrt_vs_uv"), "ours: every layer factorised and trained"),
        "dlrt_vs_uv_authors.png": lambda: dlrt_vs_uv(tables.get("dlrt_vs_uv_authors"), "the authors' setup"),
    }
    written = []
    for name, draw in figures.items():
        figure = draw()
        if figure is None:
            print(f"dlrt-tables: skipping {name}: no finished runs to plot", file=sys.stderr)
            continue
        save(figure, out_dir / name)
        written.append(out_dir / name)
    return written


def save(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    print(f"dlrt-tables: wrote {path}", file=sys.stderr)


def epoch_axis(ax, epochs) -> None:
    """Whole epochs on the x axis: each epoch a tick when there are few (a 1-epoch run's axis would otherwise be
    ticked 0.945, 0.960, ... around its one point), integer ticks chosen by matplotlib when there are many."""
    epochs = sorted({int(e) for e in epochs})
    ax.set_xlabel("epoch")
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def with_runs(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows that have a finished run, or None when there are none."""
    if frame is None or not (frame["n_seeds"] > 0).any():
        return None
    return frame[frame["n_seeds"] > 0]


def rank_evolution(runs: list):
    """One panel per low-rank layer; per ϑ the run of the smallest seed (seed 0 when it exists), of the paper's
    protocol (the authors' init) where there is one."""
    adaptive = sorted((r for r in runs if r.method == "adaptive"),
                      key=lambda r: (r.config["tau"], r.config.get("model.init", "svd") != "authors", r.seed))
    first = {}
    for run in adaptive:
        first.setdefault(run.config["tau"], run)
    if not first:
        return None
    n_layers = len([c for c in next(iter(first.values())).epochs.columns if c.startswith("rank_")])
    figure, axes = plt.subplots(1, n_layers, figsize=(4.5 * n_layers, 3.8), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(first)))
    for layer, ax in enumerate(axes[0]):
        for color, (tau, run) in zip(colors, first.items()):
            init = run.config.get("model.init", "svd")
            ax.plot(run.epochs["epoch"], run.epochs[f"rank_{layer}"], marker=".", color=color,
                    label=f"ϑ = {tau:g} (seed {run.seed}, {init} init)")
        ax.set_title(LENET5_LAYERS[layer] if n_layers == len(LENET5_LAYERS) else f"layer {layer}")
        epoch_axis(ax, [e for run in first.values() for e in run.epochs["epoch"]])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rank")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    figure.suptitle("LeNet5 / MNIST: rank of each low-rank layer during rank-adaptive DLRT training")
    return figure


def accuracy_compression(frame: pd.DataFrame | None):
    """Left: test accuracy vs ϑ (ours mean ± std per init, the paper's); right: c.r. eval, honest and paper's."""
    ours = with_runs(frame)
    if ours is None:
        return None
    paper = frame[frame["method"] == "adaptive"].drop_duplicates("tau").dropna(subset=["paper_test_acc_mean"]).sort_values("tau")
    figure, (acc_ax, cr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for init, (marker, label) in INIT_MARKERS.items():
        rows = ours[(ours["method"] == "adaptive") & (ours["init"].fillna("svd") == init)].sort_values("tau")
        if not len(rows):
            continue
        archived = " (archived rows)" if rows.get("source", pd.Series(dtype=object)).notna().any() else ""
        acc_ax.errorbar(rows["tau"], rows["test_acc_mean"], yerr=rows["test_acc_std"].fillna(0), marker=marker,
                        capsize=3, label=f"ours, {label}{archived}")
        cr_ax.plot(rows["tau"], rows["cr_eval_honest"], marker=marker, label=f"ours, {label}, honest count")
        cr_ax.plot(rows["tau"], rows["cr_eval_paper"], marker=marker, linestyle=":", label=f"ours, {label}, paper's convention")
    acc_ax.errorbar(paper["tau"], paper["paper_test_acc_mean"], yerr=paper["paper_test_acc_std"], marker="s",
                    capsize=3, linestyle="--", color="gray", label="paper")
    dense = ours[ours["method"] == "dense"]
    if len(dense):
        acc_ax.axhline(dense["test_acc_mean"].iloc[0], color="tab:blue", linestyle=":", label="dense (ours)")
    acc_ax.axhline(PAPER_LENET5_DENSE_ACC, color="gray", linestyle=":", label="dense (paper)")
    acc_ax.set(xlabel="ϑ", ylabel="test accuracy (%)", title="test accuracy at the selected epoch")
    cr_ax.plot(paper["tau"], paper["paper_cr_eval"], marker="s", linestyle="--", color="gray", label="paper")
    cr_ax.set(xlabel="ϑ", ylabel="compression rate, eval (%)", title="compression of the best run")
    for ax in (acc_ax, cr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("LeNet5 / MNIST: accuracy and compression against ϑ")
    return figure


def fc_accuracy_vs_params(frames: dict[str, pd.DataFrame]):
    """Ours: honest eval params of the best run; the paper's: Σ (n+m) r + dense from its ranks. Stars: dense."""
    if all(with_runs(frame) is None for frame in frames.values()):
        return None
    figure, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, frame in frames.items():
        color, width = FC_COLORS[name], int(frame["width"].iloc[0])
        paper = frame.dropna(subset=["paper_test_acc"]).sort_values("paper_eval_params")
        paper_low_rank, paper_dense = paper[paper["method"] == "adaptive"], paper[paper["method"] == "dense"]
        ax.plot(paper_low_rank["paper_eval_params"], paper_low_rank["paper_test_acc"], marker="s", linestyle="--",
                color=color, alpha=0.5, markerfacecolor="none", label=f"w = {width}, paper (params from its ranks)")
        ax.scatter(paper_dense["paper_eval_params"], paper_dense["paper_test_acc"], marker="*", s=150,
                   facecolors="none", edgecolors=color, label=f"w = {width}, dense (paper)")
        ours = with_runs(frame)
        if ours is None:
            continue
        archived = ours["source"].notna() if "source" in ours else pd.Series(False, index=ours.index)
        for rows, kind, fill in ((ours[~archived], "ours", color), (ours[archived], "ours, archived rows", "none")):
            if not len(rows):  # archived rows are a line of their own: never joined with this code's runs
                continue
            low_rank = rows[rows["method"] == "adaptive"].sort_values("eval_params_honest")
            dense = rows[rows["method"] == "dense"]
            ax.errorbar(low_rank["eval_params_honest"], low_rank["test_acc_mean"],
                        yerr=low_rank["test_acc_std"].fillna(0), marker="o", capsize=3, color=color,
                        markerfacecolor=fill, linestyle="-" if fill != "none" else ":", label=f"w = {width}, {kind}")
            ax.scatter(dense["eval_params_honest"], dense["test_acc_mean"], marker="*", s=150, edgecolors=color,
                       facecolors=fill, zorder=3, label=f"w = {width}, dense ({kind})")
    ax.set_xscale("log")
    ax.set(xlabel="parameters at evaluation (honest count, biases not counted)", ylabel="test accuracy (%)",
           title="5-layer FC / MNIST: accuracy against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return figure


def dlrt_vs_uv(frame: pd.DataFrame | None, setup: str):
    """One panel per initial spectrum: our mean ± std test accuracy per epoch, and the paper's published runs
    (dashed, mean ± std)."""
    ours = with_runs(frame)
    if ours is None:
        return None
    spectra = list(dict.fromkeys(ours["spectrum"]))
    epochs = sorted(int(c.split("_")[1]) for c in ours.columns if c.startswith("epoch_") and c.endswith("_mean"))
    figure, axes = plt.subplots(1, len(spectra), figsize=(4.5 * len(spectra), 3.8), squeeze=False, sharey=True)
    for ax, spectrum in zip(axes[0], spectra):
        for _, row in ours[ours["spectrum"] == spectrum].iterrows():
            label, color = UV_STYLES.get(row["method"], (row["method"], None))
            mean = np.array([row[f"epoch_{e}_mean"] for e in epochs])
            std = np.nan_to_num(np.array([row[f"epoch_{e}_std"] for e in epochs]))
            line, = ax.plot(epochs, mean, marker=".", color=color, label=f"{label} ({row['n_seeds']} runs)")
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            paper = np.array([row.get(f"paper_epoch_{e}_mean", np.nan) for e in epochs], dtype=float)
            if not np.isnan(paper).all():
                paper_std = np.nan_to_num(np.array([row.get(f"paper_epoch_{e}_std", np.nan) for e in epochs], dtype=float))
                ax.plot(epochs, paper, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{label}, paper (10 runs)")
                ax.fill_between(epochs, paper - paper_std, paper + paper_std, color=line.get_color(), alpha=0.08)
        label = SPECTRUM_LABELS.get(spectrum)
        ax.set(title=rf"$\sigma_k = {label.replace('^-k', '^{-k}')}$" if label else str(spectrum))
        epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (%)")
    figure.suptitle(f"LeNet5 at rank 20 / MNIST: DLRT against U V^T, by initial spectrum ({setup})")
    return figure
