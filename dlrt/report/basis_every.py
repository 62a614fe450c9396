"""The basis_every study (issue 26): LeNet5 at the paper's protocol (authors' init) with a basis step every k batches,
beside k = 1 (the paper's step, the runs of the LeNet5 table) and the paper's row, per ϑ the study ran."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from dlrt.experiments.protocols import LENET5, PAPER_LENET5

from .markdown import CONVENTIONS_NOTE, SELECTION_NOTE, Table, acc_cell, decimal, percent, render, runs_cell, text
from .runs import Experiment, Run, count_runs, selected_columns


def basis_every(run: Run) -> int:
    """The run's k (a run made before basis_every existed took a basis step every batch)."""
    return int(run.config.get("method.basis_every", 1))


def without_cycles(experiment: Experiment) -> Experiment:
    """The experiment's runs at k = 1: those of the paper's table."""
    return replace(experiment, completed=[r for r in experiment.completed if basis_every(r) == 1],
                   failed=[r for r in experiment.failed if basis_every(r) == 1])


def rows(experiment: Experiment) -> list[dict]:
    """One row per (ϑ, k) of the authors'-init adaptive runs, at the ϑ where some run has k > 1."""
    runs = [r for r in experiment.completed + experiment.failed
            if r.method == "adaptive" and r.config.get("model.init") == "authors"]
    taus = sorted({r.config["tau"] for r in runs if basis_every(r) > 1})
    found = []
    for tau in taus:
        for k in sorted({basis_every(r) for r in runs if r.config["tau"] == tau}):
            here = [r for r in runs if r.config["tau"] == tau and basis_every(r) == k]
            done = [r for r in here if r.summary.get("status") == "completed"]
            paper = PAPER_LENET5.get(tau)
            found.append({"method": "adaptive", "tau": tau, "basis_every": k, **count_runs(done, [r for r in here if r not in done]),
                          **selected_columns(done, extra_rank="10"),
                          "paper_test_acc": paper[0] if paper else "–", "paper_ranks": paper[1] if paper else "–"})
    return found


def tables(experiment: Experiment) -> list[Table]:
    frame = pd.DataFrame(rows(experiment))
    if frame.empty:
        return []
    cycles = [r for r in experiment.completed + experiment.failed if basis_every(r) > 1]
    sections = [("Accuracy, ranks, compression and time per k", [
        ("ϑ", lambda row: f"{row['tau']:g}"), ("k", text("basis_every")), ("runs", runs_cell),
        ("acc (ours)", acc_cell("test_acc")), ("acc (paper, k = 1)", text("paper_test_acc")),
        ("ranks (ours, best run)", text("ranks")), ("ranks (paper)", text("paper_ranks")),
        ("c.r. eval honest", percent("cr_eval_honest")), ("c.r. eval paper conv.", percent("cr_eval_paper")),
        ("s / epoch", decimal("seconds_per_epoch")),
    ])]
    notes = [SELECTION_NOTE, CONVENTIONS_NOTE,
             "k: `method.basis_every`, a basis step every k-th batch and coefficient steps (S and the dense "
             "parameters) between; k = 1 is the paper's step, the runs of lenet5_mnist.md. The basis step of a cycle "
             "truncates the core the cycle trained, then augments with its batch's gradient (dlrt/basis_cycle.py, "
             "RobustDLRT's schedule with the truncation moved into the basis step); the model is truncated after "
             "every epoch before it is evaluated. s / epoch is training and evaluation on the run's machine, beside "
             "other runs: compare steps with dlrt-bench (docs/performance.md)."]
    title = "LeNet5 on MNIST: basis updates every k batches (basis_every) against k = 1 and the paper"
    markdown = render(title, experiment, LENET5, frame, sections, notes, runs=cycles)
    return [Table("basis_every", frame, markdown)]
