"""How a table reads: its cells, its Markdown, and the header that says how it was made (commands, seeds,
epochs, devices, code versions, every departure from the paper's protocol, archived rows)."""

from __future__ import annotations

import math
import os
import shlex
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from dlrt.experiments.protocols import SPECTRUM_LABELS, TableProtocol

from .runs import Experiment, Run, method_order

ERRATA_LINK = "results/ERRATA.md"
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
UV_METHODS = {"fixed": "DLRT", "vanilla": "U V^T", "vanilla_frozen_convs": "U V^T, convs frozen (the authors')"}


@dataclass
class Table:
    name: str
    frame: pd.DataFrame
    markdown: str


# --- cells ------------------------------------------------------------------------------------


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
    """'98.12 ± 0.21', '98.12 (1 run)', or 'not run'; an archived row is marked (a)."""
    def cell(row) -> str:
        mean, std = row.get(f"{prefix}_mean"), row.get(f"{prefix}_std")
        if not row.get("n_seeds") or is_missing(mean):
            return "not run"
        value = f"{mean:.2f} (1 run)" if is_missing(std) else f"{mean:.2f} ± {std:.2f}"
        return value + (" (a)" if not is_missing(row.get("source")) else "")
    return cell


def runs_cell(row) -> str:
    return f"{row['n_seeds']}" + (f" (+{row['n_failed']} failed)" if row.get("n_failed") else "")


def tau_label(row) -> str:
    label = "dense" if row["method"] == "dense" else f"{row['tau']:g}"
    if row["method"] not in ("dense", "adaptive"):
        label += f" ({row['method']})"
    return label + settings_suffix(row)


def settings_suffix(row) -> str:
    return "" if is_missing(row.get("settings")) or not row.get("settings") else f" [{row['settings']}]"


def uv_method_label(row) -> str:
    return UV_METHODS.get(row["method"], row["method"]) + settings_suffix(row)


def row_label(row) -> str:
    if "spectrum" in row:
        return f"{SPECTRUM_LABELS.get(row['spectrum'], row['spectrum'])} {uv_method_label(row)}"
    return tau_label(row) + (f" ({row['init']} init)" if not is_missing(row.get("init")) and row.get("init") else "")


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


# --- the whole table --------------------------------------------------------------------------


def render(title, experiment: Experiment, protocol: TableProtocol, frame: pd.DataFrame, sections, notes,
           runs: list[Run] | None = None, archived: str | None = None) -> str:
    """Title, how the table was made, the tables, the notes. A section is (heading, [(column title, cell)]), one
    line per row of the frame, or (heading, Markdown)."""
    rows = frame.to_dict("records")
    parts = [f"# {title}", provenance(experiment, protocol, rows, runs, archived)]
    for heading, body in sections:
        if not isinstance(body, str):
            body = markdown_table([h for h, _ in body], [[cell(row) for _, cell in body] for row in rows])
        parts += [f"## {heading}", body]
    parts += ["## Notes", "\n\n".join(notes)]
    return "\n\n".join(parts) + "\n"


def provenance(experiment: Experiment, protocol: TableProtocol, rows: list[dict], runs: list[Run] | None = None,
               archived: str | None = None) -> str:
    """The header paragraph: commands, seeds, epochs, departures from the paper's protocol, machines, dates."""
    runs = experiment.completed + experiment.failed if runs is None else runs
    completed = [r for r in runs if r.summary.get("status") == "completed"]
    failed = [r for r in runs if r.summary.get("status") != "completed"]
    finished = sorted(r.summary["finished"] for r in completed)
    lines = [f"Made by `dlrt-tables` from {len(completed)} finished run(s) in `{experiment.folder}/`"
             + (", with:" if completed else ".")]
    if completed:
        lines += [
            "```\n" + "\n".join(command_lines(r.summary["command"] for r in completed)) + "\n```",
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
    lines += [f"- left out, unreadable: {entry}" for entry in experiment.unreadable]
    if archived:
        lines.append(f"- rows marked (a) are archived runs, kept for comparison: {archived}")
    lines.append(f"\nWhere the paper is wrong or does not say, see [{ERRATA_LINK}](../ERRATA.md).")
    return "\n".join(lines)


def command_lines(commands) -> list[str]:
    """The distinct commands, shortest first, each runnable: the program as its name (`dlrt-run`, or
    `python -m dlrt.experiments` where the module was run: records before 2026-12-06 say `dlrt.cli`), and commands that differ only in their seed merged into
    one Hydra sweep (`-m ... seed=2,3,4`), which reruns them all."""
    seeds_of: dict[tuple, set[str]] = defaultdict(set)
    for command in commands:
        program, *args = shlex.split(command)
        module = program.endswith(".py") or program == "python"
        program = "python -m dlrt.experiments" if module else os.path.basename(program)
        args = [a for a in args if a not in ("-m", "dlrt.cli", "dlrt.experiments", "--multirun")]
        seeds = [a.removeprefix("seed=") for a in args if a.startswith("seed=")]
        key = (program, tuple(None if a.startswith("seed=") else a for a in args))  # None: where the seed goes
        seeds_of[key].update(",".join(seeds).split(",") if seeds else [])
    lines = []
    for (program, args), seeds in seeds_of.items():
        merged = "seed=" + ",".join(sorted(seeds, key=lambda seed: (len(seed), seed)))
        sweep = any("," in a for a in args if a is not None) or len(seeds) > 1
        lines.append(program + (" -m " if sweep else " ") + shlex.join(merged if a is None else a for a in args))
    return sorted(lines, key=lambda line: (len(line), line))


def epochs_by_method(completed: list[Run]) -> str:
    """'dense 10, adaptive 20': the epochs each method's runs trained (fine-tuning included)."""
    methods = sorted({r.method for r in completed}, key=lambda m: (method_order(m), m))
    return ", ".join(f"{m} " + " / ".join(map(str, sorted({len(r.epochs) for r in completed if r.method == m})))
                     for m in methods)


def protocol_departures(completed: list[Run], protocol: TableProtocol, rows: list[dict]) -> list[str]:
    """Plain statements of every way our runs differ from the paper's protocol."""
    departures = defaultdict(list)
    for run in completed:
        for key, paper_value in protocol.expected(run.method).items():
            if run.config.get(key) != paper_value:
                departures[(run.method, key, paper_value)].append(run.config.get(key))
    lines = [f"NOT the paper's protocol: {method} runs have {key} = {', '.join(map(str, sorted(set(values), key=str)))} "
             f"in {len(values)} run(s) (paper: {paper_value})" for (method, key, paper_value), values in departures.items()]
    if protocol.runs_per_row:
        short = [r for r in rows if 0 < r["n_seeds"] < protocol.runs_per_row]
        if short:
            lines.append(f"FEWER runs than the paper's {protocol.runs_per_row} per row: " +
                         ", ".join(f"{row_label(r)} ({r['n_seeds']})" for r in short) + f" ({run_cost(completed)})")
    not_run = [row_label(r) for r in rows if not r["n_seeds"]]
    if not_run:
        lines.append("paper rows not run (no finished run): " + ", ".join(not_run))
    return lines


def run_cost(completed: list[Run]) -> str:
    """What one run of the table cost (from the records), and where the runs still planned are listed."""
    seconds = [r.epochs["epoch_time_s"].sum() for r in completed if "epoch_time_s" in r.epochs]
    mean = sum(seconds) / max(len(seconds), 1)
    took = f"{mean / 60:.0f} min" if mean >= 60 else f"{mean:.0f} s"
    cost = f"a run took {took} of training here on average; " if seconds else ""
    return f"{cost}`dlrt-tables --runs results/runs --missing` lists the runs the tables' sweeps plan and lack"
