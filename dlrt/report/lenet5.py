"""The paper's LeNet5 / MNIST table, ours beside it: per ϑ the paper's row, ours with the authors' initial factors
(model.init=authors, the published code's start) and ours with the library's (model.init=svd)."""

from __future__ import annotations

import pandas as pd

from dlrt.experiments.protocols import LENET5, PAPER_LENET5

from .markdown import (CONVENTIONS_NOTE, SELECTION_NOTE, Table, acc_cell, decimal, integer, markdown_table, percent,
                       render, runs_cell, tau_label, text)
from .runs import Experiment, count_runs, group_runs, method_order, paper_key, selected_columns

INITS = ("authors", "svd")
COLUMNS = [
    "method", "tau", "init", "settings", "n_seeds", "seeds", "n_failed", "test_acc_mean", "test_acc_std", "best_seed",
    "ranks", "eval_params_paper", "cr_eval_paper", "train_params_paper", "cr_train_paper",
    "eval_params_honest", "cr_eval_honest", "train_params_honest", "cr_train_honest",
    "epochs", "selected_epochs", "seconds_per_epoch",
    "paper_test_acc", "paper_test_acc_mean", "paper_test_acc_std", "paper_ranks",
    "paper_eval_params", "paper_cr_eval", "paper_train_params", "paper_cr_train", "source",
]


def paper_columns(key) -> dict:
    if key not in PAPER_LENET5:
        return {}
    acc, ranks, eval_params, cr_eval, train_params, cr_train = PAPER_LENET5[key]
    mean, std = (float(x) for x in acc.split(" ± "))
    return {"paper_test_acc": acc, "paper_test_acc_mean": mean, "paper_test_acc_std": std, "paper_ranks": ranks,
            "paper_eval_params": eval_params, "paper_cr_eval": cr_eval,
            "paper_train_params": train_params, "paper_cr_train": cr_train}


def _row_key(run) -> tuple:
    if run.method == "dense":  # no low-rank layer: the init does not apply
        return ("dense", None, "")
    return (run.method, run.config["tau"], run.config.get("model.init", "svd"))


def rows(experiment: Experiment) -> list[dict]:
    """One row per (method, ϑ, init, settings): dense first, then ϑ ascending, the authors' init first."""
    paper_rows = [("dense", None, "")] + [("adaptive", tau, init) for tau in PAPER_LENET5 if tau != "dense"
                                          for init in INITS]
    groups = group_runs(experiment.completed, experiment.failed, _row_key, paper_rows, grouped_by=("model.init",))
    order = lambda k: (method_order(k[0]), k[0], k[1] or 0, INITS.index(k[2]) if k[2] in INITS else -1, k[3])
    found = []
    for method, tau, init, settings in sorted(groups, key=order):
        done, broken = groups[(method, tau, init, settings)]
        if not done and paper_key(method, tau) not in PAPER_LENET5:
            continue
        found.append({"method": method, "tau": tau, "init": init, "settings": settings, **count_runs(done, broken),
                      **selected_columns(done, extra_rank="10"), **paper_columns(paper_key(method, tau))})
    return found


def side_by_side(frame: pd.DataFrame) -> str:
    """Per paper row: the paper, ours with the authors' init, ours with the svd init."""
    records = frame.to_dict("records")
    find = lambda method, tau, init: next((r for r in records if r["method"] == method and r.get("init", "") == init
                                           and (tau is None or r["tau"] == tau) and not r.get("settings")), None)
    body = []
    for key in PAPER_LENET5:
        method, tau = ("dense", None) if key == "dense" else ("adaptive", key)
        paper = paper_columns(key)
        ours = [find(method, tau, "")] if method == "dense" else [find(method, tau, init) for init in INITS]
        cells = [acc_cell("test_acc")(r) if r else "not run" for r in ours]
        ranks = [r["ranks"] if r and r.get("n_seeds") else "–" for r in ours]
        if method == "dense":
            cells, ranks = cells * 2, ranks * 2
        body.append(["dense" if key == "dense" else f"{key:g}", paper["paper_test_acc"], *cells,
                     paper["paper_ranks"], *ranks])
    return markdown_table(["ϑ", "acc (paper)", "acc (ours, authors' init)", "acc (ours, svd init)", "ranks (paper)",
                           "ranks (ours, authors' init)", "ranks (ours, svd init)"], body)


def label(row) -> str:
    init = row.get("init")
    return tau_label(row) + (f", {init}" if isinstance(init, str) and init else "")


def tables(experiment: Experiment, archive=None) -> list[Table]:
    from .archive import fill_from_archive

    frame, archived = fill_from_archive("lenet5_mnist", pd.DataFrame(rows(experiment), columns=COLUMNS), archive)
    frame = frame.reindex(columns=COLUMNS)
    title = "LeNet5 on MNIST: DLRT (rank-adaptive) against the paper's table"
    sections = [
        ("The paper, ours with the authors' init, ours with the svd init", side_by_side(frame)),
        ("Accuracy, ranks and size at evaluation", [
            ("ϑ, init", label), ("runs", runs_cell), ("acc (ours)", acc_cell("test_acc")),
            ("acc (paper)", text("paper_test_acc")), ("ranks (ours, best run)", text("ranks")),
            ("ranks (paper)", text("paper_ranks")), ("eval params honest (ours)", integer("eval_params_honest")),
            ("eval params paper conv. (ours)", integer("eval_params_paper")), ("eval params (paper)", integer("paper_eval_params")),
            ("c.r. eval honest (ours)", percent("cr_eval_honest")), ("c.r. eval paper conv. (ours)", percent("cr_eval_paper")),
            ("c.r. eval (paper)", percent("paper_cr_eval")),
        ]),
        ("Size during training, and time", [
            ("ϑ, init", label), ("train params honest (ours)", integer("train_params_honest")),
            ("train params paper conv. (ours)", integer("train_params_paper")), ("train params (paper)", integer("paper_train_params")),
            ("c.r. train honest (ours)", percent("cr_train_honest")), ("c.r. train paper conv. (ours)", percent("cr_train_paper")),
            ("c.r. train (paper)", percent("paper_cr_train")), ("selected epochs", text("selected_epochs")),
            ("s / epoch", decimal("seconds_per_epoch")),
        ]),
    ]
    notes = [SELECTION_NOTE, CONVENTIONS_NOTE,
             "init: *authors* starts every low-rank layer as the published code does (random orthonormal U, V and "
             "S = the r largest of 2r draws of |N(0,1)|, σ ≈ 0.7–3.3); *svd* starts it at the truncated SVD of "
             "torch's default draw (σ_max ≈ 0.75–1.03), the library's default. The paper's protocol is the authors' "
             "start (results/ERRATA.md, finding 1).",
             "The paper picked its dense row's epoch by best test accuracy; we pick every run's, dense included, "
             "by minimum validation loss. Ranks are written as the paper does, with the dense output layer's 10 last."]
    markdown = render(title, experiment, LENET5, frame, sections, notes, archived=archived)
    return [Table("lenet5_mnist", frame, markdown)]
