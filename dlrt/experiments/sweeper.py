"""dlrt-run's sweeper: Hydra's basic sweep (the product of the swept values, in batches of max_batch_size) with two
changes: every job's config is composed and checked before any job starts (so a bad value in the last job of a sweep
is refused before the first trains), and a job that fails does not end the sweep: the others run, and the sweep ends
with the list of those that failed (cli.SweepFailed).

Written on Hydra's public plugin interface (hydra.plugins.sweeper.Sweeper), as Hydra's example sweeper is: its basic
sweeper lives in hydra._internal, which Hydra may change in any release."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf


class CheckingSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        self.max_batch_size, self.params = max_batch_size, params or {}
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def jobs(self, arguments: list[str]) -> list[list[str]]:
        """Each job's overrides: the product of every key's values (a list a,b; range(); choice()), in the order
        Hydra's basic sweeper makes them, hydra.sweeper.params first and the command line's after."""
        from .validate import ConfigError

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        values: dict[str, list[str]] = {}
        for override in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            key = override.get_key_element()
            if not override.is_sweep_override():
                values[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                raise ConfigError(f"{key}: an interval has no list of values to sweep: give values (a,b,c) or range()")
        return [list(job) for job in itertools.product(*values.values())]

    def sweep(self, arguments: list[str]) -> Any:
        from .cli import SweepFailed
        from .validate import ConfigError, validate

        jobs = self.jobs(arguments)
        for number, job in enumerate(jobs):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"job {number} ({' '.join(job)}): {e}") from None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else max(len(jobs), 1)
        returns, failures = [], []
        for first in range(0, len(jobs), size):
            batch = jobs[first:first + size]
            try:
                results = self.launcher.launch(batch, initial_job_idx=first)
            except Exception as error:  # a launcher that lost a job (submitit: a killed job has no output)
                raise SweepFailed([f"jobs {first}-{first + len(batch) - 1}: the launcher lost a job "
                                   f"({' '.join(str(error).split())[:200]}); finished runs are in their folders, and "
                                   "the same command resumes the others"]) from None
            for number, (job, result) in enumerate(zip(batch, results), start=first):
                if result.status == JobStatus.FAILED:
                    # The error itself: JobReturn's public return_value re-raises it after writing a line of its own
                    # to stderr, and the sweep says each failure once, at its end.
                    error = result._return_value
                    failures.append(f"job {number} ({' '.join(job)}): {' '.join(str(error).split()) or type(error).__name__}")
            returns.append(results)
        if failures:
            raise SweepFailed(failures)
        return returns
