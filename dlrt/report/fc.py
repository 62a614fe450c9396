"""The paper's 5-layer fully connected MNIST tables (widths 500 and 784), ours beside them.

The FC protocol (protocols.FC) reads a run at its final epoch: the test accuracy after the 100 fixed-rank epochs,
the ranks at the end of the 250 rank-adaptive ones (the fine-tuning keeps them). So a row's accuracy is each run's
selected epoch, as its summary records it; runs selected by another rule (minimum validation loss, before the FC
experiment selected the final epoch) make rows of their own, labelled. Beside it: the epoch of minimum validation
loss (from epochs.csv), the runs of the authors' FC procedure (runs/fc_mnist_authors/, where there are any) and
compression rates in the FC tables' counting convention, for our ranks and the paper's.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from dlrt.experiments.protocols import FC, FC_AT_003, PAPER_FC, parse_ranks
from dlrt.experiments.run_folder import RunFolder, RunFolderError
from dlrt.metrics import MODES, WeightShape, compression_rate, count_shapes, dense_reference

from .archive import fill_from_archive
from .markdown import (Table, acc_cell, command_lines, decimal, integer, is_missing, markdown_table,
                       percent, render, runs_cell, tau_label, text)
from .runs import Experiment, Run, count_runs, group_runs, mean_std, method_order, paper_key, ranks_text, selected_columns

AUTHORS_EXPERIMENT = "fc_mnist_authors"  # the authors' FC procedure, filed by experiment folder
COLUMNS = [
    "width", "method", "tau", "selection", "settings", "n_seeds", "seeds", "n_failed", "test_acc_mean", "test_acc_std",
    "best_seed", "ranks", "adaptive_end_ranks", "min_val_loss_test_acc_mean", "min_val_loss_test_acc_std",
    "min_val_loss_ranks", "min_val_loss_epochs", "final_test_acc_mean", "final_test_acc_std", "final_ranks",
    "eval_params_fc", "cr_eval_fc", "train_params_fc", "cr_train_fc",
    "eval_params_honest", "cr_eval_honest", "train_params_honest", "cr_train_honest", "epochs", "seconds_per_epoch",
    "paper_test_acc", "paper_ranks", "paper_eval_params", "paper_cr_eval", "paper_train_params", "paper_cr_train",
    "authors_n_seeds", "authors_test_acc_mean", "authors_test_acc_std", "authors_ranks", "source",
]


def fc_shapes(width: int) -> list[tuple[int, int]]:
    """(n_out, n_in) of the 5-layer FC net's weights: four low-rank layers, then the dense output layer."""
    return [(width, 784), (width, width), (width, width), (width, width), (10, width)]


def fc_counts(width: int, ranks: str) -> dict:
    """Parameters and c.r. in the FC tables' convention (dlrt.metrics, "fc") for ranks '[r1,r2,r3,r4]' of the four
    low-rank layers or 'full'; the output layer is dense."""
    *low_rank, output = fc_shapes(width)
    per_layer = [None] * len(low_rank) if ranks == "full" else parse_ranks(ranks)
    shapes = [WeightShape(f"fc{i}", n, m, r) for i, ((n, m), r) in enumerate(zip(low_rank, per_layer))]
    shapes.append(WeightShape("output", *output, None))
    counts = {}
    for mode in MODES:
        params, dense = count_shapes(shapes, "fc", mode), dense_reference(shapes, mode)
        counts[f"{mode}_params_fc"], counts[f"cr_{mode}_fc"] = params, compression_rate(params, dense)
    return counts


def paper_columns(width: int, key) -> dict:
    if key not in PAPER_FC.get(width, {}):
        return {}
    acc, ranks = PAPER_FC[width][key]
    counts = fc_counts(width, ranks)
    return {"paper_test_acc": acc, "paper_ranks": ranks, "paper_eval_params": counts["eval_params_fc"],
            "paper_cr_eval": counts["cr_eval_fc"], "paper_train_params": counts["train_params_fc"],
            "paper_cr_train": counts["cr_train_fc"]}


def min_val_loss_columns(runs: list[Run], best: Run) -> dict:
    """Each run at its epoch of minimum validation loss: mean ± std of the test accuracy, the best run's ranks."""
    at = {run.name: run.epochs.loc[run.epochs["val_loss"].idxmin()] for run in runs}
    mean, std = mean_std([float(row["test_acc"]) for row in at.values()])
    return {"min_val_loss_test_acc_mean": mean, "min_val_loss_test_acc_std": std,
            "min_val_loss_ranks": ranks_text(at[best.name]["ranks"]),
            "min_val_loss_epochs": " ".join(str(int(row["epoch"])) for row in at.values())}


def _row_key(run: Run) -> tuple:
    return (run.method, None if run.method == "dense" else run.config["tau"], run.config.get("selection", "min_val_loss"))


def rows(experiment: Experiment, width: int, grouped_by: tuple[str, ...] = ("selection",)) -> list[dict]:
    """One row per (method, ϑ, selection, settings) of one width: dense first, then ϑ ascending. `grouped_by`: the
    keys that do not make settings of their own (the authors' procedure: its epochs, which are each ϑ's)."""
    of_width = lambda runs: [r for r in runs if r.config.get("model.width") == width]
    paper_rows = [("dense", None, FC.selection) if tau == "dense" else ("adaptive", tau, FC.selection)
                  for tau in PAPER_FC.get(width, {})]
    groups = group_runs(of_width(experiment.completed), of_width(experiment.failed), _row_key, paper_rows,
                        grouped_by=grouped_by)
    found = []
    for method, tau, selection, settings in sorted(groups, key=lambda k: (method_order(k[0]), k[0], k[1] or 0,
                                                                          k[2] != FC.selection, k[2], k[3])):
        done, broken = groups[(method, tau, selection, settings)]
        key = paper_key(method, tau)
        if not done and key not in PAPER_FC.get(width, {}):
            continue
        row = {"width": width, "method": method, "tau": tau, "selection": selection, "settings": settings,
               **count_runs(done, broken), **paper_columns(width, key)}
        if done:
            row.update(selected_columns(done))
            best = next(r for r in done if r.seed == row["best_seed"])
            train_phase = best.epochs[best.epochs["phase"] == "train"]
            row["adaptive_end_ranks"] = ranks_text(train_phase["ranks"].iloc[-1] if len(train_phase) else "")
            row.update(min_val_loss_columns(done, best))
        found.append(row)
    return found


def with_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Every row's counts in the FC convention, ours from the ranks the row shows, the paper's from its ranks (archived
    rows included: their tables had fewer columns)."""
    records = frame.to_dict("records")
    for row in records:
        tau = None if is_missing(row["tau"]) else row["tau"]
        row.update(paper_columns(int(row["width"]), paper_key(row["method"], tau)))
        if row.get("n_seeds") and isinstance(row.get("ranks"), str):
            row.update(fc_counts(int(row["width"]), row["ranks"]))
    return pd.DataFrame(records)


def with_authors(frame: pd.DataFrame, authors: Experiment | None, width: int) -> pd.DataFrame:
    """The authors' FC procedure beside each of our protocol rows (same method and ϑ), where it was run."""
    if authors is None:
        return frame
    # each ϑ's runs stop their adaptive phase where the authors' log does (protocols.FC_AUTHORS_EPOCHS)
    theirs = {(r["method"], r["tau"]): r for r in rows(authors, width, grouped_by=("selection", "epochs"))
              if r["n_seeds"] and not r["settings"]}
    records = frame.to_dict("records")
    for row in records:
        match = theirs.get((row["method"], None if is_missing(row["tau"]) else row["tau"]))
        if match and not row.get("settings") and row.get("selection") == FC.selection:
            row.update({"authors_n_seeds": match["n_seeds"], "authors_test_acc_mean": match["test_acc_mean"],
                        "authors_test_acc_std": match["test_acc_std"], "authors_ranks": match["ranks"]})
    return pd.DataFrame(records)


def load_authors(experiment: Experiment) -> Experiment | None:
    from .runs import load_experiment

    folder = experiment.folder.parent / AUTHORS_EXPERIMENT
    return load_experiment(folder.parent, AUTHORS_EXPERIMENT) if folder.is_dir() else None


def label(row) -> str:
    selection = row.get("selection")
    return tau_label(row) + ("" if selection == FC.selection else f" (selected at {selection})")


def authors_cell(row) -> str:
    if is_missing(row.get("authors_n_seeds")) or not row.get("authors_n_seeds"):
        return "–"
    return acc_cell("authors_test_acc")({**row, "n_seeds": row["authors_n_seeds"], "source": None})


def at_protocol(row: dict) -> bool:
    """A row of runs at the FC protocol: no settings of their own, or only the protocol's (archived rows name the
    epochs they trained, as theirs varied)."""
    expected = {key: str(value) for key, value in FC.expected(row["method"]).items()}
    settings = [item.split("=", 1) for item in str(row.get("settings") or "").split(", ") if item]
    return all(expected.get(key) == value for key, value in settings)


def ours_for(records: list[dict], method: str, tau) -> dict:
    """Our row for a paper row: runs at the protocol, or else an archived row at its epochs (marked (a))."""
    candidates = [r for r in records if r["method"] == method and (tau is None or r["tau"] == tau) and r.get("n_seeds")
                  and at_protocol(r)]
    candidates.sort(key=lambda r: (not is_missing(r.get("source")), r.get("selection") != FC.selection))
    return candidates[0] if candidates else {}


def authors_for(records: list[dict], method: str, tau) -> dict:
    """The record of a paper row that carries the authors' procedure (with_authors puts it on the protocol's row,
    which may have no run of ours while an archived row stands in for it)."""
    return next((r for r in records if r["method"] == method and (tau is None or r["tau"] == tau)
                 and not is_missing(r.get("authors_n_seeds")) and r.get("authors_n_seeds")), {})


def is_costly(width: int, tau) -> bool:
    """The row that may stay not run for its cost (FC_AT_003: width 784 at ϑ = 0.03)."""
    return tau == FC_AT_003.fixed["tau"] and width in FC_AT_003.grid["model.width"]


def side_by_side(frame: pd.DataFrame, width: int) -> str:
    """Per paper row: the paper, ours at the protocol (each run's final epoch, the adaptive phase's last ranks), the
    authors' procedure."""
    records = frame.to_dict("records")
    body = []
    for key in PAPER_FC.get(width, {}):
        method, tau = ("dense", None) if key == "dense" else ("adaptive", key)
        ours, paper = ours_for(records, method, tau), paper_columns(width, key)
        authors = authors_for(records, method, tau)
        acc = acc_cell("final_test_acc")(ours) if ours else "not run"
        if not ours and is_costly(width, tau):
            acc = "not run (cost: see the notes)"
        ranks = ours.get("adaptive_end_ranks", "–")
        cr = fc_counts(width, ranks)["cr_eval_fc"] if ours and isinstance(ranks, str) else None
        body.append([tau_label({"method": method, "tau": tau}), f"{paper['paper_test_acc']:.2f}", acc,
                     acc_cell("min_val_loss_test_acc")(ours) if ours else "–", paper["paper_ranks"], str(ranks),
                     percent("paper_cr_eval")(paper), percent("cr")({"cr": cr}), authors_cell(authors),
                     text("authors_ranks")(authors)])
    return markdown_table(["ϑ", "acc (paper)", "acc (ours, final epoch)", "acc (ours, min val loss epoch)",
                           "ranks (paper)", "ranks (ours, end of the adaptive phase)", "c.r. eval (paper's ranks)",
                           "c.r. eval (ours)", "acc (authors' procedure)", "ranks (authors' procedure)"], body)


def notes(frame: pd.DataFrame, authors: Experiment | None, width: int) -> list[str]:
    found = [
        "'acc (ours)' is the mean ± sample standard deviation over seeds of each run's selected epoch's test "
        "accuracy, in % (the final epoch, the FC protocol's); ranks and parameter counts are those of the best run "
        "(the highest such accuracy). The first section shows, per paper row, our runs at the protocol, or where "
        "there are none an archived run of the protocol's epochs read at its final epoch, marked (a). 'min val loss epoch': each run at its epoch of minimum validation loss (from "
        "epochs.csv), the rule of the LeNet5 table; with Adam it comes early in the 250 adaptive epochs, before the "
        "ranks have come down. A row that reads 'not run' has no finished run of ours.",
        "c.r. eval and the FC-convention counts are the FC tables' (PAPER.md §4): eval Σ (n+m) r, train "
        "Σ (2 (n+m) r + 4 r²), over the four low-rank layers (784→w, w→w, w→w, w→w), plus the dense output layer "
        "w→10 (its weight, and its gradient in training); the paper's FC table gives accuracies and ranks only, its "
        "counts here are computed from its ranks. The honest counts (dlrt.metrics) are what is stored: U, V and "
        "diag S, (n+m) r + r at evaluation, 3 (n+m) r + 6 r² in training; biases are never counted.",
        "Where our ranks are more than 30 % from the paper's, results/ERRATA.md (finding 6) says why: the paper's are "
        "those of the authors' code, whose random start holds layers 2-4 up (ours below at large ϑ) and whose "
        "restarted Adam and V rotation bring ranks down (ours above at small ϑ), each shown by a run. "
        "results/diagnostics/fc_rank_gap/ compares every layer with their logs, their code run on our data and the "
        "authors' procedure"
        + (" (at width 500, where their logs are read and their code was run; the same script, which T@9bd6e9e has "
           "at width 784, likely made these rows)." if width == 784 else "."),
    ]
    at_003 = frame[(frame["tau"] == FC_AT_003.fixed["tau"]) & (frame["n_seeds"] > 0) & (frame["settings"].fillna("") == "")
                   & (frame["selection"] == FC.selection)]
    if is_costly(width, FC_AT_003.fixed["tau"]) and at_003.empty:
        found.append(f"ϑ = {FC_AT_003.fixed['tau']} is not run at the protocol: {FC_AT_003.cost}. `dlrt-tables "
                     f"--missing` lists it after the other tables' runs (`{FC_AT_003.command()}`).")
    if authors is not None and authors.completed:
        found.append("The authors' procedure (width 500: Adam whose moments restart at every step of the rank-adaptive "
                     "phase and stay in place in the fine-tuning; results/ERRATA.md, finding 4): "
                     f"{len(authors.completed)} finished run(s) in `{authors.folder}/`, with "
                     + "; ".join(f"`{line}`" for line in command_lines(r.summary["command"] for r in authors.completed))
                     + ".")
    else:
        found.append(f"The authors' procedure column is empty: no finished run in `{AUTHORS_EXPERIMENT}/`.")
    if frame["source"].notna().any():
        found.append("Rows marked (a) are kept for comparison only: runs of 2026-11-27 (an older code version, one "
                     "seed each, no run records), selected at their epoch of minimum validation loss; their final "
                     "epoch is beside it in 'Every row', and in the first section where no run of ours is at the "
                     "protocol.")
    return found


def _width_of(path) -> int | None:
    try:
        return RunFolder(path).config()["model"].get("width")
    except (RunFolderError, KeyError):
        return None


def tables(experiment: Experiment, archive=None) -> list[Table]:
    result = []
    authors = load_authors(experiment)
    widths = {run.config.get("model.width") for run in experiment.completed + experiment.failed} | set(PAPER_FC)
    for width in sorted(w for w in widths if w is not None):
        frame = pd.DataFrame(rows(experiment, width), columns=COLUMNS)
        frame, archived = fill_from_archive(f"fc{width}_mnist", frame, archive)
        frame = with_authors(with_counts(frame), authors, width).reindex(columns=COLUMNS)
        sections = [
            ("The paper's table, ours at its protocol, the authors' procedure", side_by_side(frame, width)),
            ("Every row: accuracy, ranks and size", [
                ("ϑ", label), ("runs", runs_cell), ("acc (ours)", acc_cell("test_acc")),
                ("acc at min val loss (ours)", acc_cell("min_val_loss_test_acc")), ("acc (paper)", decimal("paper_test_acc", 2)),
                ("ranks (ours, best run)", text("ranks")), ("ranks at min val loss (ours, best run)", text("min_val_loss_ranks")),
                ("ranks (paper)", text("paper_ranks")), ("acc at the final epoch (ours)", acc_cell("final_test_acc")),
                ("ranks at the final epoch (ours, best run)", text("final_ranks")), ("eval params (ours)", integer("eval_params_fc")),
                ("c.r. eval (ours)", percent("cr_eval_fc")), ("eval params (paper's ranks)", integer("paper_eval_params")),
                ("c.r. eval (paper's ranks)", percent("paper_cr_eval")),
            ]),
            ("Size during training, honest counts, and time", [
                ("ϑ", label), ("train params (ours)", integer("train_params_fc")), ("c.r. train (ours)", percent("cr_train_fc")),
                ("train params (paper's ranks)", integer("paper_train_params")), ("c.r. train (paper's ranks)", percent("paper_cr_train")),
                ("eval params honest (ours)", integer("eval_params_honest")), ("c.r. eval honest (ours)", percent("cr_eval_honest")),
                ("train params honest (ours)", integer("train_params_honest")), ("c.r. train honest (ours)", percent("cr_train_honest")),
                ("epochs", text("epochs")), ("min val loss epochs", text("min_val_loss_epochs")), ("s / epoch", decimal("seconds_per_epoch")),
            ]),
        ]
        running = [name for name in experiment.unfinished if _width_of(experiment.folder / name) == width]
        view = replace(experiment, unfinished=running)  # this width's runs only
        runs = [r for r in experiment.completed + experiment.failed if r.config.get("model.width") == width]
        title = f"5-layer fully connected net, width {width}, on MNIST: DLRT against the paper's table"
        result.append(Table(f"fc{width}_mnist", frame, render(title, view, FC, frame, sections, notes(frame, authors, width),
                                                              runs, archived=archived)))
    return result
