"""dlrt-tables: our results beside the paper's (PAPER.md §3), from the run folders.

    dlrt-tables --runs results/runs --out results --archive results/archive/2026-11-27
    dlrt-tables --runs runs_quick --out results/quick --experiments lenet5_mnist
    dlrt-tables --runs results/runs --missing > missing.txt    # the dlrt-run commands the tables still miss

It reads <runs>/<experiment>/<run>/{config.yaml, epochs.csv, summary.json} and writes <out>/tables/<table>.csv
and .md, then the figures of dlrt.report.plots into <out>/plots/; run folders outside the paper's experiments (a
sweep of one's own) get tables of their own, dlrt.report.sweep. Without --out it writes into tables_out/, so that
it never overwrites committed results unless told to. A paper row with no finished run of ours reads "not run" (or
shows an archived row, marked as such): no number is ever filled in for us. With --missing it writes nothing but
prints the runs of protocols.SWEEPS that have no finished folder under --runs (dlrt.report.missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlrt.experiments.run_folder import RunFolderError, write_text

from . import basis_every, fc, lenet5, missing, plots, sweep, uv
from .markdown import Table
from .runs import load_experiment

BUILDERS = {"lenet5_mnist": lambda experiment, archive: (lenet5.tables(basis_every.without_cycles(experiment), archive)
                                                        + basis_every.tables(experiment)),
            "fc_mnist": fc.tables, "dlrt_vs_uv": uv.tables, "dlrt_vs_uv_authors": uv.tables}
EXPERIMENTS = tuple(BUILDERS)
DEFAULT_OUT = Path("tables_out")
# Counts stay integers in the CSV even in columns that "not run" rows leave empty.
INTEGER_COLUMNS = ("width", "n_seeds", "n_failed", "best_seed", "eval_params_paper", "train_params_paper",
                   "eval_params_honest", "train_params_honest", "paper_eval_params", "paper_train_params")


def write_table(table: Table, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    frame = table.frame.astype({c: "Int64" for c in INTEGER_COLUMNS if c in table.frame.columns})
    write_text(folder / f"{table.name}.csv", frame.to_csv(index=False))
    write_text(folder / f"{table.name}.md", table.markdown)
    print(f"dlrt-tables: wrote {folder / table.name}.csv and .md", file=sys.stderr)


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") is ".": an empty argument is a slip, not a choice of this folder
        raise argparse.ArgumentTypeError("is empty: give a folder ('.' for this one)")
    return Path(text)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dlrt-tables", description="Tables and plots of our runs beside the paper's numbers.")
    parser.add_argument("--runs", type=_folder, default=Path("runs"), help="the folder of run folders (default: runs)")
    parser.add_argument("--out", type=_folder, default=DEFAULT_OUT,
                        help=f"tables go to OUT/tables, plots to OUT/plots (default: {DEFAULT_OUT})")
    parser.add_argument("--archive", type=_folder, default=None,
                        help="a folder of earlier table CSVs whose rows fill rows that have no run (marked as archived)")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS), metavar="NAME",
                        help=f"which experiments (default: all of {', '.join(EXPERIMENTS)})")
    parser.add_argument("--missing", action="store_true",
                        help="print the dlrt-run command of every run of the tables (protocols.SWEEPS) that has no "
                             "finished folder under --runs, one per line, and write nothing")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="with --missing: overrides every listed run takes (a quick pass: epochs=2 data.subset=5000)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="with --missing: only the first N seeds of each sweep")
    args = parser.parse_args(argv)
    if args.missing:
        try:
            args.override = missing.parse_overrides(args.override)
        except ValueError as e:
            parser.error(str(e))
        return args
    if args.override or args.seeds is not None:
        parser.error("--override and --seeds go with --missing: they choose which runs it lists")
    if not args.runs.is_dir():
        parser.error(f"--runs {args.runs}: no such folder")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    if args.archive is not None and not args.archive.is_dir():
        parser.error(f"--archive {args.archive}: no such folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return tabulate(args)
    except (OSError, RunFolderError) as e:  # --out cannot be made or written (a full disk): written files stay whole
        print(f"dlrt-tables: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def tabulate(args) -> int:
    if args.missing:
        runs = missing.planned_runs(overrides=args.override, seeds=args.seeds)
        print("\n".join(missing.missing_commands(args.runs, runs)))
        return 0
    tables, runs = {}, {}
    for name in args.experiments:
        experiment = load_experiment(args.runs, name)
        runs[name] = experiment.completed
        for table in BUILDERS[name](experiment, args.archive):
            if not table.frame["n_seeds"].fillna(0).any():
                print(f"dlrt-tables: {table.name}: no finished run in {experiment.folder}, nothing written", file=sys.stderr)
                continue
            write_table(table, args.out / "tables")
            tables[table.name] = table.frame
    swept = sweep.tabulate(args.runs, args.out, skip=EXPERIMENTS)  # runs outside the paper's experiments
    if not tables:
        if not swept:
            print(f"dlrt-tables: nothing to tabulate in {args.runs}", file=sys.stderr)
        return 0
    plots.make_plots(tables, runs, args.out / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
