"""The paper's 5-layer fully connected MNIST tables (widths 500 and 784), ours beside them."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pandas as pd

from dlrt.experiments.protocols import FC, PAPER_FC
from dlrt.experiments.run_folder import RunFolder, RunFolderError

from .archive import fill_from_archive
from .markdown import (CONVENTIONS_NOTE, SELECTION_NOTE, Table, acc_cell, decimal, integer, percent, render, runs_cell,
                       tau_label, text)
from .runs import Experiment, tau_rows

COLUMNS = [
    "width", "method", "tau", "settings", "n_seeds", "seeds", "n_failed", "test_acc_mean", "test_acc_std", "best_seed",
    "ranks", "eval_params_honest", "cr_eval_honest", "eval_params_paper", "cr_eval_paper",
    "train_params_honest", "cr_train_honest", "train_params_paper", "cr_train_paper",
    "epochs", "selected_epochs", "seconds_per_epoch", "final_test_acc_mean", "final_test_acc_std", "final_ranks",
    "paper_test_acc", "paper_ranks", "paper_eval_params", "paper_cr_eval", "source",
]


def fc_shapes(width: int) -> list[tuple[int, int]]:
    """(n_out, n_in) of the 5-layer FC net's weights: four low-rank layers, then the dense output layer."""
    return [(width, 784), (width, width), (width, width), (width, width), (10, width)]


def paper_eval_params(width: int, ranks: str) -> int:
    """The paper's FC eval count from its ranks: Σ (n+m) r over the low-rank layers + the dense output layer."""
    *low_rank, (n_out, n_in) = fc_shapes(width)
    if ranks == "full":
        return sum(n * m for n, m in low_rank) + n_out * n_in
    rs = [int(r) for r in ranks.strip("[]").split(",")]
    return sum((n + m) * r for (n, m), r in zip(low_rank, rs)) + n_out * n_in


def paper_columns(width: int) -> Callable:
    def columns(key) -> dict:
        if key not in PAPER_FC.get(width, {}):
            return {}
        acc, ranks = PAPER_FC[width][key]
        params, dense = paper_eval_params(width, ranks), paper_eval_params(width, "full")
        return {"paper_test_acc": acc, "paper_ranks": ranks, "paper_eval_params": params,
                "paper_cr_eval": (1 - params / dense) * 100}
    return columns


def _width_of(path) -> int | None:
    try:
        return RunFolder(path).config()["model"].get("width")
    except (RunFolderError, KeyError):
        return None


def tables(experiment: Experiment, archive=None) -> list[Table]:
    result = []
    widths = {run.config.get("model.width") for run in experiment.completed + experiment.failed} | set(PAPER_FC)
    for width in sorted(widths):
        completed = [r for r in experiment.completed if r.config.get("model.width") == width]
        failed = [r for r in experiment.failed if r.config.get("model.width") == width]
        rows = [{"width": width, **row} for row in tau_rows(completed, failed, list(PAPER_FC.get(width, {})),
                                                           paper_columns(width))]
        frame, archived = fill_from_archive(f"fc{width}_mnist", pd.DataFrame(rows, columns=COLUMNS), archive)
        frame = frame.reindex(columns=COLUMNS)
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
                 "can be well above the final ones: the last section shows ours at the end of training too. The "
                 "authors' FC runs (TensorFlow) restarted Adam's moments on every batch: results/ERRATA.md, finding 4.",
                 "The paper's FC table gives accuracies and ranks only. Its parameter counts here are computed from "
                 "its ranks the way its FC tables count: Σ (n+m) r over the four low-rank layers (784→w, w→w, w→w, "
                 "w→w) plus the dense output layer w→10; that is our honest count without the r entries of diag S."]
        running = [name for name in experiment.unfinished if _width_of(experiment.folder / name) == width]
        view = replace(experiment, unfinished=running)  # this width's runs only
        result.append(Table(f"fc{width}_mnist", frame, render(title, view, FC, frame, sections, notes,
                                                              completed + failed, archived=archived)))
    return result
