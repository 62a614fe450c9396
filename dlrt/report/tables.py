"""dlrt-tables: our results beside the paper's (PAPER.md §3), from the run folders.

    dlrt-tables                                   every known experiment, runs/ -> results/
    dlrt-tables --runs runs_quick --out results/quick --experiments lenet5_mnist

It reads <runs>/<experiment>/<run>/{config.yaml, epochs.csv, summary.json} and writes
<out>/tables/<table>.csv and .md, then the figures of dlrt.plots into <out>/plots/.

Only completed runs are averaged. Failed runs are named in the table's header, never averaged in; runs
without summary.json (still training) are left out with a note on stderr. A paper row with no finished
run of ours reads "not run": no number is ever filled in for us.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd
from omegaconf import OmegaConf

from . import plots

EXPERIMENTS = ("lenet5_mnist", "fc_mnist", "dlrt_vs_uv")

# ---------------------------------------------------------------------------------------------
# the paper's numbers (PAPER.md §1 and §3), as printed there
# ---------------------------------------------------------------------------------------------

# LeNet5 / MNIST: ϑ (or "dense") -> test acc, ranks, eval params, c.r. eval, train params, c.r. train
PAPER_LENET5 = {
    "dense": ("98.8 ± 0.06", "[20,50,500,10]", 430500, 0.0, 861000, 0.0),
    0.09: ("98.2 ± 0.26", "[10,23,62,10]", 37445, 91.3, 532176, 38.2),
    0.11: ("98.2 ± 0.44", "[10,20,48,10]", 30278, 93.0, 412898, 52.0),
    0.13: ("97.9 ± 0.49", "[9,16,37,10]", 24542, 94.3, 316997, 63.2),
    0.15: ("98.1 ± 0.33", "[9,16,28,10]", 20033, 95.3, 251477, 70.8),
    0.2: ("98.1 ± 0.34", "[8,8,15,10]", 13091, 97.0, 135536, 84.3),
    0.3: ("97.5 ± 0.48", "[4,6,8,10]", 9398, 97.8, 80792, 90.6),
    0.4: ("96.0 ± 0.94", "[2,4,4,10]", 7250, 98.3, 47882, 94.4),
    0.45: ("94.1 ± 0.49", "[2,2,3,10]", 6647, 98.5, 35654, 95.9),
}

# 5-layer FC / MNIST: width -> ϑ (or "dense") -> test acc, ranks of the 4 low-rank layers
PAPER_FC = {
    500: {
        "dense": (98.54, "full"), 0.03: (98.49, "[176,170,171,174]"), 0.05: (98.56, "[81,104,111,117]"),
        0.07: (98.52, "[52,67,73,72]"), 0.09: (98.34, "[35,53,51,46]"), 0.11: (98.11, "[27,40,37,38]"),
        0.13: (97.50, "[20,31,32,30]"), 0.15: (97.22, "[17,25,26,24]"), 0.17: (96.90, "[13,21,24,20]"),
    },
    784: {
        "dense": (98.53, "full"), 0.03: (98.61, "[190,190,190,190]"), 0.05: (98.59, "[124,120,125,126]"),
        0.07: (98.58, "[76,86,85,83]"), 0.09: (98.49, "[56,67,63,59]"), 0.11: (98.12, "[35,49,47,43]"),
        0.13: (97.95, "[29,35,38,34]"), 0.15: (97.81, "[22,29,27,27]"), 0.17: (97.40, "[17,23,22,23]"),
    },
}

# DLRT (fixed-rank KLS) against U V^T, LeNet5 at rank 20: (spectrum, method) -> final test accuracy
PAPER_DLRT_VS_UV = {
    ("one", "fixed"): 97.8, ("pow2", "fixed"): 97.3, ("pow10", "fixed"): 97.1,
    ("one", "vanilla"): 93.7, ("pow2", "vanilla"): 90.9, ("pow10", "vanilla"): 86.2,
}
SPECTRA = {"one": "1", "pow2": "2^-k", "pow10": "10^-k"}
UV_METHODS = {"fixed": "DLRT", "vanilla": "U V^T"}


@dataclass(frozen=True)
class Protocol:
    """The paper's protocol for one table: what the header compares our runs against."""

    text: str
    settings: Callable[[str], dict]  # method -> {config key: the paper's value}
    runs_per_row: int | None  # None: the paper does not say


LENET5_PROTOCOL = Protocol(
    "SGD lr 0.05, batch 128, 20 epochs (dense: 10), paper split of the 70k MNIST images, 5 runs per row",
    lambda method: {"epochs": 10 if method == "dense" else 20, "lr": 0.05, "batch_size": 128,
                    "data.name": "mnist", "data.split": "paper", "data.subset": None},
    5,
)
FC_PROTOCOL = Protocol(
    "Adam lr 1e-3, batch 256, 50k/10k/10k split, 250 rank-adaptive epochs then 100 fixed-rank epochs "
    "(the paper does not say how many runs its FC table averages)",
    lambda method: {"epochs": 250, "lr": 0.001, "batch_size": 256, "optim.name": "adam", "data.name": "mnist",
                    "data.subset": None, **({} if method == "dense" else {"finetune.epochs": 100})},
    None,
)
DLRT_VS_UV_PROTOCOL = Protocol(
    "LeNet5 at rank 20, SGD lr 0.01, batch 128, 20 epochs, 10 runs",
    lambda method: {"epochs": 20, "lr": 0.01, "batch_size": 128, "model.rank": 20, "data.name": "mnist",
                    "data.subset": None},
    10,
)

# ---------------------------------------------------------------------------------------------
# reading run folders
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    config: dict  # flattened, "model.name" -> value
    summary: dict
    epochs: pd.DataFrame | None  # None for a failed run

    @property
    def method(self) -> str:
        return self.config["method.name"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def test_acc(self) -> float:
        return self.summary["selected"]["test_acc"]


@dataclass
class Experiment:
    folder: Path
    completed: list[Run]
    failed: list[Run]
    unfinished: list[str]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"name": "fc"}} -> {"model.name": "fc"}; lists become tuples so values can be compared."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def _config_of(run_dir: Path) -> dict:
    """A run folder's resolved config, flattened; {} before the run has written it."""
    path = run_dir / "config.yaml"
    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True)) if path.exists() else {}


def load_experiment(runs_dir: Path, name: str) -> Experiment:
    folder = runs_dir / name
    experiment = Experiment(folder, [], [], [])
    for run_dir in sorted(p for p in folder.glob("*") if p.is_dir()):
        if not (run_dir / "summary.json").exists():
            experiment.unfinished.append(run_dir.name)
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        config = _config_of(run_dir)
        if summary.get("status") == "completed":
            experiment.completed.append(Run(run_dir.name, config, summary, pd.read_csv(run_dir / "epochs.csv")))
        else:
            experiment.failed.append(Run(run_dir.name, config, summary, None))
    if experiment.unfinished:
        print(f"dlrt-tables: {name}: leaving out {len(experiment.unfinished)} run(s) without summary.json "
              f"(still running?): {', '.join(experiment.unfinished)}", file=sys.stderr)
    return experiment


# Keys that do not change what a run computes, plus those every table groups by: they never split a row.
NOT_SETTINGS = {"seed", "tau", "method.name", "out_dir", "progress", "device", "eval_batch_size", "threads",
                "flush_denormal", "data.root"}


def settings_labels(runs: list[Run], grouped_by: tuple[str, ...] = ()) -> dict[str, str]:
    """Run name -> the settings in which it differs from runs of the same method ("" when none do).

    Runs that differ in anything but seed and the table's grouping keys (a smoke run with epochs=2
    next to the real ones, say) must not be averaged together: the label keeps them in separate rows.
    """
    labels = {}
    for method in {run.method for run in runs}:
        same = [run for run in runs if run.method == method]
        keys = sorted({key for run in same for key in run.config} - NOT_SETTINGS - set(grouped_by))
        # A key that older runs' configs lack was added later, with a default that keeps the older
        # behaviour: only values that are present can differ.
        varying = [key for key in keys if len({run.config[key] for run in same if key in run.config}) > 1]
        for run in same:
            labels[run.name] = ", ".join(f"{key}={run.config[key]}" for key in varying if key in run.config)
    return labels


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def ranks_text(ranks, extra: str = "") -> str:
    """'9 16 28' -> '[9,16,28]' (+ the dense output layer's rank when the paper writes it); dense: 'full'."""
    if not isinstance(ranks, str) or not ranks.strip():
        return "full"
    return "[" + ",".join(ranks.split() + ([extra] if extra else [])) + "]"


def count_runs(completed: list[Run], failed: list[Run]) -> dict:
    return {"n_seeds": len(completed), "seeds": " ".join(str(r.seed) for r in sorted(completed, key=lambda r: r.seed)),
            "n_failed": len(failed)}


def selected_columns(runs: list[Run], extra_rank: str = "") -> dict:
    """Mean ± std of the selected epochs' test accuracy; ranks and counts of the best run."""
    if not runs:
        return {}
    runs = sorted(runs, key=lambda r: r.seed)
    best = max(runs, key=lambda r: r.test_acc)
    row = best.summary["selected"]
    mean, std = mean_std([r.test_acc for r in runs])
    final_mean, final_std = mean_std([r.summary["final"]["test_acc"] for r in runs])
    return {
        "test_acc_mean": mean, "test_acc_std": std, "best_seed": best.seed,
        "ranks": ranks_text(row["ranks"], extra_rank),
        "final_test_acc_mean": final_mean, "final_test_acc_std": final_std,
        "final_ranks": ranks_text(best.summary["final"]["ranks"], extra_rank),
        **{f"{mode}_params_{conv}": row[f"params_{mode}_{conv}"] for conv in ("paper", "honest") for mode in ("eval", "train")},
        **{f"cr_{mode}_{conv}": row[f"cr_{mode}_{conv}"] for conv in ("paper", "honest") for mode in ("eval", "train")},
        "epochs": " ".join(map(str, sorted({len(r.epochs) for r in runs}))),
        "selected_epochs": " ".join(str(r.summary["selected_epoch"]) for r in runs),
        "seconds_per_epoch": statistics.mean(r.summary["seconds_per_epoch"] for r in runs),
    }


def method_order(method: str) -> int:
    return {"dense": 0, "adaptive": 1}.get(method, 2)


def group_runs(completed: list[Run], failed: list[Run], key: Callable, paper_rows: list[tuple],
               grouped_by: tuple[str, ...] = ()) -> dict[tuple, tuple[list, list]]:
    """Row key -> (completed, failed). key(run) gives a row key without settings; the settings label is
    appended. Every paper row is there, if need be with no runs."""
    labels = settings_labels(completed + failed, grouped_by)
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for index, runs in enumerate((completed, failed)):
        for run in runs:
            groups[(*key(run), labels[run.name])][index].append(run)
    for row in paper_rows:
        if not any(found[:-1] == row for found in groups):
            groups[(*row, "")] = ([], [])
    return dict(groups)


def tau_key(run: Run) -> tuple:
    return (run.method, None if run.method == "dense" else run.config["tau"])


def paper_tau_rows(paper_taus) -> list[tuple]:
    """The paper's ϑ (or "dense") rows as our (method, ϑ) keys."""
    return [("dense", None) if tau == "dense" else ("adaptive", tau) for tau in paper_taus]


def paper_key(method: str, tau):
    """The paper's row for our (method, ϑ): its tables have rank-adaptive DLRT rows and a dense row."""
    return "dense" if method == "dense" else tau if method == "adaptive" else None


def tau_rows(completed, failed, paper_taus, paper_columns: Callable, extra_rank: str = "") -> list[dict]:
    """One row per (method, ϑ, settings): dense first, then ϑ ascending."""
    groups = group_runs(completed, failed, tau_key, paper_tau_rows(paper_taus))
    rows = []
    for method, tau, settings in sorted(groups, key=lambda k: (method_order(k[0]), k[0], k[1] or 0, k[2])):
        done, broken = groups[(method, tau, settings)]
        if not done and paper_key(method, tau) not in paper_taus:
            continue  # not a paper row and nothing finished: nothing to show
        rows.append({"method": method, "tau": tau, "settings": settings, **count_runs(done, broken),
                     **selected_columns(done, extra_rank), **paper_columns(paper_key(method, tau))})
    return rows


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    markdown: str


LENET5_COLUMNS = [
    "method", "tau", "settings", "n_seeds", "seeds", "n_failed", "test_acc_mean", "test_acc_std", "best_seed", "ranks",
    "eval_params_paper", "cr_eval_paper", "train_params_paper", "cr_train_paper",
    "eval_params_honest", "cr_eval_honest", "train_params_honest", "cr_train_honest",
    "epochs", "selected_epochs", "seconds_per_epoch",
    "paper_test_acc", "paper_test_acc_mean", "paper_test_acc_std", "paper_ranks",
    "paper_eval_params", "paper_cr_eval", "paper_train_params", "paper_cr_train",
]


def lenet5_paper_columns(key) -> dict:
    if key not in PAPER_LENET5:
        return {}
    acc, ranks, eval_params, cr_eval, train_params, cr_train = PAPER_LENET5[key]
    mean, std = (float(x) for x in acc.split(" ± "))
    return {"paper_test_acc": acc, "paper_test_acc_mean": mean, "paper_test_acc_std": std, "paper_ranks": ranks,
            "paper_eval_params": eval_params, "paper_cr_eval": cr_eval,
            "paper_train_params": train_params, "paper_cr_train": cr_train}


def lenet5_tables(experiment: Experiment) -> list[Table]:
    rows = tau_rows(experiment.completed, experiment.failed, list(PAPER_LENET5), lenet5_paper_columns, extra_rank="10")
    frame = pd.DataFrame(rows, columns=LENET5_COLUMNS)
    title = "LeNet5 on MNIST: DLRT (rank-adaptive) against the paper's table"
    sections = [
        ("Accuracy, ranks and size at evaluation", [
            ("ϑ", tau_label), ("runs", runs_cell), ("acc (ours)", acc_cell("test_acc")),
            ("acc (paper)", text("paper_test_acc")), ("ranks (ours, best run)", text("ranks")),
            ("ranks (paper)", text("paper_ranks")), ("eval params honest (ours)", integer("eval_params_honest")),
            ("eval params paper conv. (ours)", integer("eval_params_paper")), ("eval params (paper)", integer("paper_eval_params")),
            ("c.r. eval honest (ours)", percent("cr_eval_honest")), ("c.r. eval paper conv. (ours)", percent("cr_eval_paper")),
            ("c.r. eval (paper)", percent("paper_cr_eval")),
        ]),
        ("Size during training, and time", [
            ("ϑ", tau_label), ("train params honest (ours)", integer("train_params_honest")),
            ("train params paper conv. (ours)", integer("train_params_paper")), ("train params (paper)", integer("paper_train_params")),
            ("c.r. train honest (ours)", percent("cr_train_honest")), ("c.r. train paper conv. (ours)", percent("cr_train_paper")),
            ("c.r. train (paper)", percent("paper_cr_train")), ("selected epochs", text("selected_epochs")),
            ("s / epoch", decimal("seconds_per_epoch")),
        ]),
    ]
    notes = [SELECTION_NOTE, CONVENTIONS_NOTE,
             "The paper picked its dense row's epoch by best test accuracy; we pick every run's, dense included, "
             "by minimum validation loss. Ranks are written as the paper does, with the dense output layer's 10 last."]
    markdown = render(title, experiment, LENET5_PROTOCOL, frame, sections, notes)
    return [Table("lenet5_mnist", frame, markdown)]


FC_COLUMNS = [
    "width", "method", "tau", "settings", "n_seeds", "seeds", "n_failed", "test_acc_mean", "test_acc_std", "best_seed",
    "ranks", "eval_params_honest", "cr_eval_honest", "eval_params_paper", "cr_eval_paper",
    "train_params_honest", "cr_train_honest", "train_params_paper", "cr_train_paper",
    "epochs", "selected_epochs", "seconds_per_epoch", "final_test_acc_mean", "final_test_acc_std", "final_ranks",
    "paper_test_acc", "paper_ranks", "paper_eval_params", "paper_cr_eval",
]


def fc_shapes(width: int) -> list[tuple[int, int]]:
    """(n_out, n_in) of the 5-layer FC net's weights: four low-rank layers, then the dense output layer."""
    return [(width, 784), (width, width), (width, width), (width, width), (10, width)]


def fc_paper_eval_params(width: int, ranks: str) -> int:
    """The paper's FC eval count from its ranks: Σ (n+m) r over the low-rank layers + the dense output layer."""
    *low_rank, (n_out, n_in) = fc_shapes(width)
    if ranks == "full":
        return sum(n * m for n, m in low_rank) + n_out * n_in
    rs = [int(r) for r in ranks.strip("[]").split(",")]
    return sum((n + m) * r for (n, m), r in zip(low_rank, rs)) + n_out * n_in


def fc_paper_columns(width: int) -> Callable:
    def columns(key) -> dict:
        if key not in PAPER_FC.get(width, {}):
            return {}
        acc, ranks = PAPER_FC[width][key]
        params, dense = fc_paper_eval_params(width, ranks), fc_paper_eval_params(width, "full")
        return {"paper_test_acc": acc, "paper_ranks": ranks, "paper_eval_params": params,
                "paper_cr_eval": (1 - params / dense) * 100}
    return columns


def fc_tables(experiment: Experiment) -> list[Table]:
    tables = []
    for width in sorted({run.config.get("model.width") for run in experiment.completed + experiment.failed}):
        completed = [r for r in experiment.completed if r.config.get("model.width") == width]
        failed = [r for r in experiment.failed if r.config.get("model.width") == width]
        paper_taus = list(PAPER_FC.get(width, {}))
        rows = [{"width": width, **row} for row in tau_rows(completed, failed, paper_taus, fc_paper_columns(width))]
        frame = pd.DataFrame(rows, columns=FC_COLUMNS)
        title = f"5-layer fully connected net, width {width}, on MNIST: DLRT against the paper's table"
        sections = [
            ("Accuracy, ranks and size at evaluation", [
                ("ϑ", tau_label), ("runs", runs_cell), ("acc (ours)", acc_cell("test_acc")),
                ("acc (paper)", decimal("paper_test_acc", 2)), ("ranks (ours, best run)", text("ranks")),
                ("ranks (paper)", text("paper_ranks")), ("eval params honest (ours)", integer("eval_params_honest")),
                ("eval params Σ(n+m)r (paper's ranks)", integer("paper_eval_params")),
                ("c.r. eval honest (ours)", percent("cr_eval_honest")), ("c.r. eval (paper's ranks)", percent("paper_cr_eval")),
                ("eval params paper conv. (ours)", integer("eval_params_paper")), ("c.r. eval paper conv. (ours)", percent("cr_eval_paper")),
            ]),
            ("Size during training, and time", [
                ("ϑ", tau_label), ("train params honest (ours)", integer("train_params_honest")),
                ("c.r. train honest (ours)", percent("cr_train_honest")), ("train params paper conv. (ours)", integer("train_params_paper")),
                ("c.r. train paper conv. (ours)", percent("cr_train_paper")), ("epochs", text("epochs")),
                ("selected epochs", text("selected_epochs")), ("s / epoch", decimal("seconds_per_epoch")),
            ]),
            ("At the end of training (the paper's FC ranks are final ranks)", [
                ("ϑ", tau_label), ("acc at the end (ours)", acc_cell("final_test_acc")),
                ("acc at min val loss (ours)", acc_cell("test_acc")), ("acc (paper)", decimal("paper_test_acc", 2)),
                ("ranks at the end (ours, best run)", text("final_ranks")),
                ("ranks at min val loss (ours, best run)", text("ranks")), ("ranks (paper)", text("paper_ranks")),
            ]),
        ]
        notes = [SELECTION_NOTE, CONVENTIONS_NOTE,
                 "The paper's FC table gives final ranks, and does not say at which epoch its accuracy was read. With "
                 "long training the validation loss is lowest early (Adam overfits), so the selected epoch's ranks "
                 "can be well above the final ones: the last section shows ours at the end of training too.",
                 "The paper's FC table gives accuracies and ranks only. Its parameter counts here are computed from "
                 "its ranks the way its FC tables count: Σ (n+m) r over the four low-rank layers (784→w, w→w, w→w, "
                 "w→w) plus the dense output layer w→10; that is our honest count without the r entries of diag S."]
        running = [name for name in experiment.unfinished
                   if _config_of(experiment.folder / name).get("model.width") == width]
        view = replace(experiment, unfinished=running)  # this width's runs only
        tables.append(Table(f"fc{width}_mnist", frame, render(title, view, FC_PROTOCOL, frame, sections, notes,
                                                              completed + failed)))
    return tables


def epoch_accuracies(runs: list[Run], n_epochs: int) -> list[tuple[float, float]]:
    """Per epoch 1..n_epochs: mean and std of the test accuracy over runs."""
    by_epoch = [r.epochs.set_index("epoch")["test_acc"] for r in runs]
    return [mean_std([acc[e] for acc in by_epoch if e in acc.index]) for e in range(1, n_epochs + 1)]


def dlrt_vs_uv_tables(experiment: Experiment) -> list[Table]:
    groups = group_runs(experiment.completed, experiment.failed, lambda run: (run.config.get("model.spectrum"), run.method),
                        list(PAPER_DLRT_VS_UV), grouped_by=("model.spectrum",))
    n_epochs = max((len(r.epochs) for r in experiment.completed), default=0)
    rows = []
    for spectrum, method, settings in sorted(groups, key=spectrum_order):
        done, broken = groups[(spectrum, method, settings)]
        if not done and (spectrum, method) not in PAPER_DLRT_VS_UV:
            continue
        row = {"spectrum": spectrum, "method": method, "settings": settings, **count_runs(done, broken)}
        for epoch, (mean, std) in enumerate(epoch_accuracies(done, n_epochs), start=1):
            row[f"epoch_{epoch}_mean"], row[f"epoch_{epoch}_std"] = mean, std
        row["final_mean"], row["final_std"] = mean_std([r.summary["final"]["test_acc"] for r in done])
        row["selected_mean"], row["selected_std"] = mean_std([r.test_acc for r in done])
        row["paper_final"] = PAPER_DLRT_VS_UV.get((spectrum, method), math.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    title = "DLRT against plain U V^T training: LeNet5 at rank 20 on MNIST, three initial spectra"
    summary = [
        ("spectrum", lambda r: SPECTRA.get(r["spectrum"], str(r["spectrum"]))), ("method", uv_method_label),
        ("runs", runs_cell), ("final acc (ours)", acc_cell("final")), ("final acc (paper)", decimal("paper_final", 1)),
        ("acc at min val loss (ours)", acc_cell("selected")),
    ]
    per_epoch = per_epoch_markdown(frame, n_epochs)
    notes = ["Final = the test accuracy after the last epoch, the paper's number; 'acc at min val loss' is the "
             "project's selection rule, for comparison. Accuracies are mean ± sample std over seeds, in %. "
             "DLRT here is the fixed-rank KLS integrator (method=fixed); U V^T is simultaneous SGD on both factors "
             "(method=vanilla)."]
    markdown = render(title, experiment, DLRT_VS_UV_PROTOCOL, frame, [("Final test accuracy", summary)], notes,
                      extra_sections=[("Test accuracy per epoch (ours, mean ± std)", per_epoch)])
    return [Table("dlrt_vs_uv", frame, markdown)]


def spectrum_order(key: tuple) -> tuple:
    spectrum, method, settings = key
    return (list(SPECTRA).index(spectrum) if spectrum in SPECTRA else len(SPECTRA), str(spectrum), method, settings)


def uv_method_label(row) -> str:
    return UV_METHODS.get(row["method"], row["method"]) + (f" [{row['settings']}]" if row["settings"] else "")


def per_epoch_markdown(frame: pd.DataFrame, n_epochs: int) -> str:
    """Epochs down, (spectrum, method) across: 20 epoch columns would not read."""
    rows = [r for r in frame.to_dict("records") if r["n_seeds"]]
    header = ["epoch"] + [f"{SPECTRA.get(r['spectrum'], r['spectrum'])}: {uv_method_label(r)}" for r in rows]
    body = [[str(e)] + [acc_cell(f"epoch_{e}")(r) for r in rows] for e in range(1, n_epochs + 1)]
    return markdown_table(header, body)


BUILDERS = {"lenet5_mnist": lenet5_tables, "fc_mnist": fc_tables, "dlrt_vs_uv": dlrt_vs_uv_tables}

# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

SELECTION_NOTE = (
    "Each run is read at its selected epoch (minimum validation loss, the paper's rule). 'acc (ours)' is the "
    "mean ± sample standard deviation over seeds of that epoch's test accuracy, in %; ranks and parameter counts "
    "are those of the best run (the highest such accuracy). A row that reads 'not run' has no finished run of ours.")
CONVENTIONS_NOTE = (
    "Two ways to count parameters (biases never counted; c.r. = (1 − params / dense params) × 100 %). "
    "*Honest*: what is stored. A rank-r layer with an n_out × n_in weight keeps U, V and diag S: (n_out + n_in) r + r "
    "at evaluation, 3 (n_out + n_in) r + 6 r² in training. *Paper convention* (its LeNet5 table): (n_out + 1) r at "
    "evaluation, which leaves the n_in × r factor V out, and 5 (n_out + n_in) r + 12 r² in training. Dense layers "
    "count n_out n_in (eval) and 2 n_out n_in (train) in both.")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text(column: str) -> Callable:
    return lambda row: "–" if is_missing(row.get(column)) or row.get(column) == "" else str(row[column])


def integer(column: str) -> Callable:
    return lambda row: "–" if is_missing(row.get(column)) else str(int(row[column]))


def decimal(column: str, digits: int = 1) -> Callable:
    return lambda row: "–" if is_missing(row.get(column)) else f"{row[column]:.{digits}f}"


def percent(column: str) -> Callable:
    return lambda row: "–" if is_missing(row.get(column)) else f"{row[column]:.1f} %"


def acc_cell(prefix: str) -> Callable:
    """'98.12 ± 0.21', '98.12 (1 run)', or 'not run'."""
    def cell(row) -> str:
        mean, std = row.get(f"{prefix}_mean"), row.get(f"{prefix}_std")
        if not row["n_seeds"] or is_missing(mean):
            return "not run"
        return f"{mean:.2f} (1 run)" if is_missing(std) else f"{mean:.2f} ± {std:.2f}"
    return cell


def runs_cell(row) -> str:
    return f"{row['n_seeds']}" + (f" (+{row['n_failed']} failed)" if row["n_failed"] else "")


def tau_label(row) -> str:
    label = "dense" if row["method"] == "dense" else f"{row['tau']:g}"
    if row["method"] not in ("dense", "adaptive"):
        label += f" ({row['method']})"
    return label + (f" [{row['settings']}]" if row["settings"] else "")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def render(title, experiment: Experiment, protocol: Protocol, frame: pd.DataFrame, sections, notes,
           runs: list[Run] | None = None, extra_sections=()) -> str:
    """Title, how the table was made, the tables, the notes."""
    rows = frame.to_dict("records")
    parts = [f"# {title}", provenance(experiment, protocol, rows, runs)]
    for heading, columns in sections:
        parts += [f"## {heading}", markdown_table([h for h, _ in columns], [[cell(row) for _, cell in columns] for row in rows])]
    for heading, table in extra_sections:
        parts += [f"## {heading}", table]
    parts += ["## Notes", "\n\n".join(notes)]
    return "\n\n".join(parts) + "\n"


def provenance(experiment: Experiment, protocol: Protocol, rows: list[dict], runs: list[Run] | None = None) -> str:
    """The header paragraph: commands, seeds, epochs, departures from the paper's protocol, machines, dates."""
    runs = experiment.completed + experiment.failed if runs is None else runs
    completed = [r for r in runs if r.summary.get("status") == "completed"]
    failed = [r for r in runs if r.summary.get("status") != "completed"]
    commands = command_lines(r.summary["command"] for r in completed)
    finished = sorted(r.summary["finished"] for r in completed)
    lines = [f"Made by `dlrt-tables` from {len(completed)} finished run(s) in `{experiment.folder}/`"
             + (", with:" if completed else ".")]
    if completed:
        lines += [
            "```\n" + "\n".join(commands) + "\n```",
            f"- seeds: {', '.join(map(str, sorted({r.seed for r in completed})))}",
            f"- epochs trained per run: {epochs_by_method(completed)}",
            f"- device(s): {'; '.join(sorted({r.summary['device'] for r in completed}))}; torch "
            f"{', '.join(sorted({r.summary['torch'] for r in completed}))}",
            f"- code version(s): {', '.join(sorted({r.summary['code_version'] for r in completed}))}",
            f"- runs finished between {finished[0]} and {finished[-1]}",
        ]
    lines.append(f"- the paper's protocol: {protocol.text}")
    lines += [f"- **{line}**" for line in protocol_departures(completed, protocol, rows)]
    lines += [f"- failed, not averaged: {r.name} ({r.summary.get('reason', 'no reason recorded')})" for r in failed]
    if experiment.unfinished:
        lines.append(f"- left out, still running (no summary.json): {len(experiment.unfinished)} run(s)")
    return "\n".join(lines)


def command_lines(commands) -> list[str]:
    """The distinct commands, shortest first: the program as its name (`dlrt-run`, or `python -m dlrt.cli`
    where the module was run), and commands that differ only in their seed merged into one Hydra sweep
    (`seed=2,3,4`), which reruns them all."""
    seeds_of: dict[tuple, set[str]] = defaultdict(set)
    for command in commands:
        program, *args = shlex.split(command)
        program = "python -m dlrt.cli" if program.endswith(".py") else os.path.basename(program)
        seeds = [a.removeprefix("seed=") for a in args if a.startswith("seed=")]
        key = (program, tuple(None if a.startswith("seed=") else a for a in args))  # None: where the seed goes
        seeds_of[key].update(",".join(seeds).split(",") if seeds else [])
    lines = []
    for (program, args), seeds in seeds_of.items():
        merged = "seed=" + ",".join(sorted(seeds, key=lambda seed: (len(seed), seed)))
        lines.append(program + " " + shlex.join(merged if a is None else a for a in args))
    return sorted(lines, key=lambda line: (len(line), line))


def epochs_by_method(completed: list[Run]) -> str:
    """'dense 10, adaptive 20': the epochs each method's runs trained (fine-tuning included)."""
    methods = sorted({r.method for r in completed}, key=lambda m: (method_order(m), m))
    return ", ".join(f"{m} " + " / ".join(map(str, sorted({len(r.epochs) for r in completed if r.method == m})))
                     for m in methods)


def protocol_departures(completed: list[Run], protocol: Protocol, rows: list[dict]) -> list[str]:
    """Plain statements of every way our runs differ from the paper's protocol."""
    departures = defaultdict(list)
    for run in completed:
        for key, paper_value in protocol.settings(run.method).items():
            if run.config.get(key) != paper_value:
                departures[(run.method, key, paper_value)].append(run.config.get(key))
    lines = [f"NOT the paper's protocol: {method} runs have {key} = {', '.join(map(str, sorted(set(values), key=str)))} "
             f"in {len(values)} run(s) (paper: {paper_value})" for (method, key, paper_value), values in departures.items()]
    if protocol.runs_per_row:
        short = [r for r in rows if 0 < r["n_seeds"] < protocol.runs_per_row]
        if short:
            lines.append(f"FEWER runs than the paper's {protocol.runs_per_row} per row: " +
                         ", ".join(f"{row_label(r)} ({r['n_seeds']})" for r in short))
    not_run = [row_label(r) for r in rows if not r["n_seeds"]]
    if not_run:
        lines.append("paper rows not run (no finished run): " + ", ".join(not_run))
    return lines


def row_label(row) -> str:
    return tau_label(row) if "tau" in row else f"{SPECTRA.get(row['spectrum'], row['spectrum'])} {uv_method_label(row)}"


# ---------------------------------------------------------------------------------------------
# files and the command line
# ---------------------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# Counts stay integers in the CSV even in columns that "not run" rows leave empty.
INTEGER_COLUMNS = ("width", "n_seeds", "n_failed", "best_seed", "eval_params_paper", "train_params_paper",
                   "eval_params_honest", "train_params_honest", "paper_eval_params", "paper_train_params")


def write_table(table: Table, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    frame = table.frame.astype({c: "Int64" for c in INTEGER_COLUMNS if c in table.frame.columns})
    write_atomic(folder / f"{table.name}.csv", lambda tmp: frame.to_csv(tmp, index=False))
    write_atomic(folder / f"{table.name}.md", lambda tmp: tmp.write_text(table.markdown))
    print(f"dlrt-tables: wrote {folder / table.name}.csv and .md", file=sys.stderr)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dlrt-tables", description="Tables and plots of our runs beside the paper's numbers.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the folder of run folders (default: runs)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="tables go to OUT/tables, plots to OUT/plots")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS), metavar="NAME",
                        help=f"which experiments (default: all of {', '.join(EXPERIMENTS)})")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"--runs {args.runs}: no such folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tables, runs = {}, {}
    for name in args.experiments:
        experiment = load_experiment(args.runs, name)
        if not experiment.completed and not experiment.failed:
            print(f"dlrt-tables: {name}: no finished run in {experiment.folder}", file=sys.stderr)
            continue
        runs[name] = experiment.completed
        for table in BUILDERS[name](experiment):
            write_table(table, args.out / "tables")
            tables[table.name] = table.frame
    if not tables:
        print(f"dlrt-tables: nothing to tabulate in {args.runs}", file=sys.stderr)
        return 0
    plots.make_plots(tables, runs, args.out / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
