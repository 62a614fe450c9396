"""Tables of a user's own runs: any folder of run folders, not only the paper's experiments.

    dlrt-run -m tau=0.1,0.2 'seed=range(3)' out_dir=myruns
    dlrt-tables --runs myruns        # tables_out/tables/sweep_myruns.{csv,md}, tables_out/plots/sweep_myruns.png

Every folder under --runs that holds run folders makes one table (the paper's experiment folders keep their own
tables, dlrt.report.tables). A row is one setting: runs that differ only in their seed are averaged together, and
the keys in which rows differ are the table's first columns. Each run is read at its selected epoch (summary.json);
a row gives the mean ± sample standard deviation of the selected test accuracy over its seeds, and the ranks,
parameter counts and compression rates, in both conventions, of its best run. When ϑ varies, a figure draws
accuracy and compression against ϑ.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

from dlrt.experiments.runner import NOT_IN_NAME
from dlrt.experiments.schema import RANK_ADAPTIVE

from .markdown import CONVENTIONS_NOTE, Table, acc_cell, command_lines, epochs_by_method, integer, is_missing, \
    markdown_table, percent, runs_cell, text
from .runs import Experiment, Run, count_runs, load_runs, method_order, selected_columns

NOT_SETTINGS = set(NOT_IN_NAME) | {"seed"}  # a row averages over seeds; these change nothing computed
LABELS = {"method.name": "method", "tau": "ϑ"}


def sweep_folders(runs_dir: Path, skip=()) -> dict[str, list[Path]]:
    """Table name -> run folders: the folders holding config.yaml under runs_dir, by the folder that holds them,
    except those under runs_dir/<name> for a name in `skip` (the paper's experiments)."""
    runs_dir = Path(runs_dir)
    folders = defaultdict(list)
    for config in sorted(runs_dir.rglob("config.yaml")):
        parent = config.parent.parent
        if parent == runs_dir.parent:  # --runs is one run folder
            parent = runs_dir
        where = parent.relative_to(runs_dir).parts
        if where and where[0] in skip:
            continue
        folders["sweep_" + "_".join(where or [runs_dir.resolve().name])].append(config.parent)
    return dict(folders)


def setting_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ between the runs that have them (beyond the seed; a method's own keys are
    not compared with the runs of methods that lack them): the method and ϑ always first."""
    keys = sorted({key for run in runs for key in run.config} - NOT_SETTINGS)
    varying = [key for key in keys if len({run.config[key] for run in runs if key in run.config}) > 1]
    return ["method.name", "tau"] + [key for key in varying if key not in ("method.name", "tau")]


def rows(experiment: Experiment) -> list[dict]:
    """One row per setting, with its runs' seeds averaged; ϑ is left empty for the methods that do not read it."""
    keys = setting_keys(experiment.completed + experiment.failed)
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for index, runs in enumerate((experiment.completed, experiment.failed)):
        for run in runs:
            groups[tuple(run.config.get(key) for key in keys)][index].append(run)
    table = []
    for setting, (done, broken) in groups.items():
        latest = {run.seed: run for run in sorted(done, key=lambda r: r.summary.get("finished", ""))}
        row = dict(zip(keys, setting))
        if row["method.name"] not in RANK_ADAPTIVE:
            row["tau"] = None
        table.append({**row, **count_runs(list(latest.values()), broken), **selected_columns(list(latest.values()))})
    order = lambda row: (method_order(row["method.name"]), row["method.name"], [str(row[k]) for k in keys[2:]],
                         -1 if row["tau"] is None else row["tau"])
    return sorted(table, key=order)


def sweep_table(name: str, experiment: Experiment) -> Table:
    frame = pd.DataFrame(rows(experiment))
    settings = [column for column in frame.columns if column in setting_keys(experiment.completed + experiment.failed)]
    count = lambda column: integer(column)
    columns = [(LABELS.get(key, key), text(key)) for key in settings] + [
        ("runs", runs_cell), ("test acc (%)", acc_cell("test_acc")), ("ranks (best run)", text("ranks")),
        ("eval params, honest", count("eval_params_honest")), ("c.r. eval, honest", percent("cr_eval_honest")),
        ("eval params, paper", count("eval_params_paper")), ("c.r. eval, paper", percent("cr_eval_paper")),
        ("train params, honest", count("train_params_honest")), ("c.r. train, honest", percent("cr_train_honest")),
        ("train params, paper", count("train_params_paper")), ("c.r. train, paper", percent("cr_train_paper")),
    ]
    records = frame.to_dict("records")
    body = markdown_table([title for title, _ in columns], [[cell(row) for _, cell in columns] for row in records])
    notes = ("Each run is read at the epoch its `selection` chose (summary.json). 'test acc' is the mean ± sample "
             "standard deviation over the row's seeds of that epoch's test accuracy; ranks, parameter counts and "
             "compression rates (c.r.) are those of the row's best run. A row averages runs that differ only in "
             "their seed.")
    markdown = "\n\n".join([f"# Runs in `{experiment.folder}/`", header(experiment), "## Test accuracy, ranks and "
                            "compression", body, "## Notes", notes + "\n\n" + CONVENTIONS_NOTE]) + "\n"
    return Table(name, frame, markdown)


def header(experiment: Experiment) -> str:
    completed = experiment.completed
    lines = [f"Made by `dlrt-tables` from {len(completed)} finished run(s) in `{experiment.folder}/`"
             + (", with:" if completed else ".")]
    if completed:
        lines += ["```\n" + "\n".join(command_lines(r.summary["command"] for r in completed)) + "\n```",
                  f"- seeds: {', '.join(map(str, sorted({r.seed for r in completed})))}",
                  f"- epochs trained per run: {epochs_by_method(completed)}",
                  f"- device(s): {'; '.join(sorted({r.summary['device'] for r in completed}))}"]
    lines += [f"- failed, not averaged: {r.name} ({r.summary.get('reason', 'no reason recorded')})"
              for r in experiment.failed]
    if experiment.unfinished:
        lines.append(f"- left out, still running (no summary.json): {', '.join(experiment.unfinished)}")
    lines += [f"- left out, unreadable: {entry}" for entry in experiment.unreadable]
    return "\n".join(lines)


def accuracy_compression(frame: pd.DataFrame, title: str):
    """Accuracy (mean ± std) and compression at evaluation (honest and the paper's convention) against ϑ, one line
    per setting besides ϑ; None when ϑ takes fewer than two values among the runs of rank-adaptive methods."""
    from .plots import plt

    low_rank = frame[frame["tau"].notna() & (frame["n_seeds"] > 0)]
    if low_rank["tau"].nunique() < 2:
        return None
    others = [c for c in frame.columns if c not in ("tau",) and c in setting_keys_of(frame)]
    figure, (acc_ax, cr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, rows in low_rank.groupby(others, dropna=False, sort=False):
        rows = rows.sort_values("tau")
        label = ", ".join(f"{LABELS.get(k, k)}={v}" for k, v in zip(others, setting if isinstance(setting, tuple)
                                                                      else (setting,)) if not is_missing(v))
        acc_ax.errorbar(rows["tau"], rows["test_acc_mean"], yerr=rows["test_acc_std"].fillna(0), marker="o",
                        capsize=3, label=label)
        line, = cr_ax.plot(rows["tau"], rows["cr_eval_honest"], marker="o", label=f"{label}, honest")
        cr_ax.plot(rows["tau"], rows["cr_eval_paper"], marker="o", linestyle=":", color=line.get_color(),
                   label=f"{label}, paper's convention")
    for _, row in frame[frame["tau"].isna() & (frame["n_seeds"] > 0)].iterrows():
        acc_ax.axhline(row["test_acc_mean"], linestyle="--", color="gray", label=f"{row['method.name']} (no ϑ)")
    acc_ax.set(xlabel="ϑ", ylabel="test accuracy (%)", title="test accuracy at the selected epoch")
    cr_ax.set(xlabel="ϑ", ylabel="compression rate, eval (%)", title="compression of the best run")
    for ax in (acc_ax, cr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title)
    return figure


def setting_keys_of(frame: pd.DataFrame) -> list[str]:
    """The setting columns of a sweep table's frame: those before n_seeds."""
    return list(frame.columns[:list(frame.columns).index("n_seeds")])


def tabulate(runs_dir: Path, out: Path, skip=()) -> list[str]:
    """Write a table (and, when ϑ varies, a figure) for every folder of runs under runs_dir outside `skip`;
    returns the names of the tables written."""
    from .plots import save
    from .tables import write_table

    written = []
    for name, paths in sweep_folders(runs_dir, skip).items():
        experiment = load_runs(paths, paths[0].parent)
        if not experiment.completed:
            print(f"dlrt-tables: {name}: no finished run in {experiment.folder}, nothing written", file=sys.stderr)
            continue
        table = sweep_table(name, experiment)
        write_table(table, out / "tables")
        written.append(name)
        figure = accuracy_compression(table.frame, f"runs in {experiment.folder}/: accuracy and compression against ϑ")
        if figure is not None:
            (out / "plots").mkdir(parents=True, exist_ok=True)
            save(figure, out / "plots" / f"{name}.png")
    return written
