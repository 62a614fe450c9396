"""`dlrt-tables --missing`: the dlrt-run commands the tables still miss, one per line, in the order of
protocols.SWEEPS, from the run folders present under a runs folder.

A run counts as done when a folder of its experiment holds its config and a summary: every key the two configs both
have, except those that do not change what a run computes (runner.NOT_IN_NAME), has the same value. So a folder
named by an older code version (`tau0` where today's name says `tau0.0`) still counts, and a run of other settings
(another lr, or the FC runs selected by minimum validation loss before the FC protocol read the final epoch) does
not. A run whose folder has no summary.json (interrupted, or still running) is listed: dlrt-run resumes it. A
failed run is not (dlrt-run skips it until its folder is deleted); stderr names it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from dlrt.experiments.protocols import SWEEPS, Sweep
from dlrt.experiments.run_folder import RunFolder, RunFolderError
from dlrt.experiments.runner import NOT_IN_NAME
from dlrt.experiments.schema import flatten, used

# How the commands run: one thread each (two runs share the CPU), no progress bars in the logs.
RUN_OPTIONS = {"threads": 1, "progress": "false"}


def parse_overrides(texts: list[str]) -> dict:
    """['epochs=2', 'data.subset=5000'] -> {'epochs': 2, 'data.subset': 5000}."""
    overrides = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {text!r}: write KEY=VALUE, as on dlrt-run's command line (epochs=2)")
        overrides[key] = yaml.safe_load(value) if value else ""
    return overrides


def planned_runs(sweeps=None, overrides: dict | None = None, seeds: int | None = None) -> list[dict]:
    """Every run of the sweeps (default: protocols.SWEEPS) as its dlrt-run overrides, in order, with `overrides` on
    top; `seeds` keeps the first few seeds of each sweep (a quick pass over every row)."""
    runs = []
    for sweep in SWEEPS if sweeps is None else sweeps:
        grid = dict(sweep.grid)
        if seeds is not None and "seed" in grid:
            grid["seed"] = grid["seed"][:seeds]
        runs += [{**run, **(overrides or {})} for run in Sweep(sweep.experiment, grid, sweep.fixed).runs()]
    return runs


def _text(value) -> str:
    return "null" if value is None else str(value)


def command(run: dict, runs_dir: Path) -> str:
    args = {**run, "out_dir": runs_dir, **RUN_OPTIONS}
    return "dlrt-run " + " ".join(f"{key}={_text(value)}" for key, value in args.items())


def _is_group(key: str) -> bool:
    from dlrt.experiments.schema import CONFIG_DIR

    return (CONFIG_DIR / key).is_dir()


@functools.lru_cache(maxsize=None)
def _composed(groups: tuple[tuple[str, str], ...]) -> dict:
    from dlrt.experiments.cli import compose_config

    cfg = compose_config([f"{key}={value}" for key, value in groups])
    return flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def expected_config(run: dict) -> tuple[dict, dict]:
    """The run's resolved config, flattened (composed once per choice of config groups, the values set on top), and
    the config of its groups alone (the defaults of the keys its values set)."""
    groups = tuple((key, _text(value)) for key, value in run.items() if _is_group(key))
    values = {key: value for key, value in run.items() if not _is_group(key)}
    return {**_composed(groups), **values}, _composed(groups)


def same_run(expected: dict, found: dict, defaults: dict | None = None) -> bool:
    """A key the folder lacks (written before the key existed) counts as its default: `defaults`, the config of
    the run's groups without its values, says what that default is today. A key the run does not read
    (schema.unused_keys: ϑ of a dense run) is not compared: today's folders do not record it."""
    defaults = expected if defaults is None else defaults
    for key in used(expected).keys() - set(NOT_IN_NAME):
        recorded = found[key] if key in found else defaults.get(key, expected[key])
        if expected[key] != recorded:
            return False
    return True


def _folders(experiment_dir: Path) -> list[tuple[str, dict, dict | None]]:
    """(name, flattened config, summary or None) of every readable run folder of an experiment."""
    folders = []
    for path in sorted(p for p in experiment_dir.glob("*") if p.is_dir()):
        try:
            folder = RunFolder(path)
            folders.append((path.name, flatten(folder.config()), folder.summary()))
        except RunFolderError as e:
            print(f"dlrt-tables: skipping an unreadable run folder, {path.name}: {e}", file=sys.stderr)
    return folders


def missing_commands(runs_dir: Path, runs: list[dict]) -> list[str]:
    """The commands of the runs that have no finished folder under runs_dir, in order."""
    folders = {}
    lines = []
    for run in runs:
        experiment = run["experiment"]
        if experiment not in folders:
            folders[experiment] = _folders(Path(runs_dir) / experiment)
        expected, defaults = expected_config(run)
        summaries = [summary for _, config, summary in folders[experiment] if same_run(expected, config, defaults)]
        if any(summary is not None and summary.get("status") == "completed" for summary in summaries):
            continue
        failed = [summary for summary in summaries if summary is not None]
        if failed:
            print(f"dlrt-tables: not listed, failed before ({failed[0].get('reason', 'no reason recorded')}): "
                  f"{command(run, runs_dir)}; delete its folder to run it again", file=sys.stderr)
            continue
        lines.append(command(run, runs_dir))
    return lines
