"""Run folders as the tables see them: finished, failed, still running or unreadable, and grouped into table rows.

Only completed runs are averaged. Failed runs are named in a table's header, never averaged in; runs without
summary.json (still training) are left out with a note; a folder whose files cannot be read is named and skipped.
Runs that differ in anything but their seed and the table's grouping keys are never averaged together: a
settings label keeps them in rows of their own.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from dlrt.experiments.run_folder import RunFolder, RunFolderError
from dlrt.experiments.schema import flatten


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
    unreadable: list[str] = field(default_factory=list)  # "name: why"


def load_runs(paths: list[Path], where: Path) -> Experiment:
    """Run folders as the tables see them: completed, failed, unfinished (no summary.json) or unreadable."""
    experiment = Experiment(where, [], [], [])
    for path in paths:
        folder = RunFolder(path)
        try:
            summary = folder.summary()
            if summary is None:
                experiment.unfinished.append(path.name)
                continue
            config = flatten(folder.config())
            if summary["status"] == "completed":
                experiment.completed.append(Run(path.name, config, summary, folder.epochs()))
            else:
                experiment.failed.append(Run(path.name, config, summary, None))
        except (RunFolderError, KeyError) as e:
            experiment.unreadable.append(f"{path.name}: {e}")
    for entry in experiment.unreadable:
        print(f"dlrt-tables: {where}: skipping an unreadable run folder, {entry}", file=sys.stderr)
    return experiment


def load_experiment(runs_dir: Path, name: str) -> Experiment:
    folder = Path(runs_dir) / name
    experiment = load_runs(sorted(p for p in folder.glob("*") if p.is_dir()), folder)
    if experiment.unfinished:
        print(f"dlrt-tables: {name}: leaving out {len(experiment.unfinished)} run(s) without summary.json "
              f"(still running?): {', '.join(experiment.unfinished)}", file=sys.stderr)
    return experiment


# Keys that do not change what a run computes, plus those every table groups by: they never split a row.
NOT_SETTINGS = {"seed", "tau", "method.name", "out_dir", "progress", "device", "eval_batch_size", "threads",
                "flush_denormal", "data.root", "data.workers", "svd_on", "cuda_graphs"}


def settings_labels(runs: list[Run], grouped_by: tuple[str, ...] = ()) -> dict[str, str]:
    """Run name -> the settings in which it differs from runs of the same method ("" when none do).

    A key that older runs' configs lack came with a default that keeps the behaviour: such a run holds today's
    default of its method (method.basis_every = 1 before basis_every existed), so that a run at another value gets
    a row of its own, labelled; runs at a method key's default are not labelled by it. A key only older runs have
    (model.protocol.* of dlrt 0.1) went: only present values differ.
    """
    labels = {}
    for method in {run.method for run in runs}:
        same = [run for run in runs if run.method == method]
        defaults = method_defaults(method)
        value = lambda run, key: run.config.get(key, defaults.get(key))
        keys = sorted({key for run in same for key in run.config} - NOT_SETTINGS - set(grouped_by))
        varying = [key for key in keys
                   if len({value(run, key) for run in same if key in run.config or key in defaults}) > 1]
        for run in same:  # a method key at its default is no setting of its own: the paper's rows have none
            labels[run.name] = ", ".join(f"{key}={value(run, key)}" for key in varying
                                         if (key in run.config or key in defaults)
                                         and not (key in defaults and value(run, key) == defaults[key]))
    return labels


@functools.lru_cache(maxsize=None)
def method_defaults(method: str) -> dict:
    """The method group's keys and their defaults today ({} for a method that is no config option of ours)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from dlrt.experiments.cli import compose_config

    try:
        node = compose_config([f"method={method}"]).method
    except HydraException:
        return {}
    return flatten(OmegaConf.to_container(node, resolve=True), "method.")


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
    for done, _ in groups.values():  # one seed counts once: two folders of the same run (named by two code versions)
        latest = {}
        for run in sorted(done, key=lambda r: r.summary.get("finished", "")):
            latest[run.seed] = run
        done[:] = sorted(latest.values(), key=lambda r: r.seed)
    for row in paper_rows:
        if not any(found[:-1] == row for found in groups):
            groups[(*row, "")] = ([], [])
    return dict(groups)


def tau_key(run: Run) -> tuple:
    return (run.method, None if run.method == "dense" else run.config["tau"])


def paper_key(method: str, tau):
    """The paper's row for our (method, ϑ): its tables have rank-adaptive DLRT rows and a dense row."""
    return "dense" if method == "dense" else tau if method == "adaptive" else None


def tau_rows(completed, failed, paper_taus, paper_columns: Callable, extra_rank: str = "") -> list[dict]:
    """One row per (method, ϑ, settings): dense first, then ϑ ascending."""
    paper_rows = [("dense", None) if tau == "dense" else ("adaptive", tau) for tau in paper_taus]
    groups = group_runs(completed, failed, tau_key, paper_rows)
    rows = []
    for method, tau, settings in sorted(groups, key=lambda k: (method_order(k[0]), k[0], k[1] or 0, k[2])):
        done, broken = groups[(method, tau, settings)]
        if not done and paper_key(method, tau) not in paper_taus:
            continue  # not a paper row and nothing finished: nothing to show
        rows.append({"method": method, "tau": tau, "settings": settings, **count_runs(done, broken),
                     **selected_columns(done, extra_rank), **paper_columns(paper_key(method, tau))})
    return rows
