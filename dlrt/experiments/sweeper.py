"""Hydra's basic sweeper with two changes for dlrt-run: every job's config is composed and checked before any job
starts (so a bad value in the last job of a sweep is refused before the first trains), and a job that fails does
not end the sweep: the others run, and the sweep ends with the list of those that failed (cli.SweepFailed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf


class CheckingSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from .cli import SweepFailed
        from .validate import ConfigError, validate

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        jobs = [job for batch in self.overrides for job in batch]
        for number, job in enumerate(jobs):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"job {number} ({' '.join(job)}): {e}") from None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, failures, first = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            try:
                results = self.launcher.launch(batch, initial_job_idx=first)
            except Exception as error:  # a launcher that lost a job (submitit: a killed job has no output)
                raise SweepFailed([f"jobs {first}-{first + len(batch) - 1}: the launcher lost a job "
                                   f"({' '.join(str(error).split())[:200]}); finished runs are in their folders, and "
                                   "the same command resumes the others"]) from None
            for number, (job, result) in enumerate(zip(batch, results), start=first):
                if result.status == JobStatus.FAILED:
                    error = result._return_value
                    failures.append(f"job {number} ({' '.join(job)}): {' '.join(str(error).split()) or type(error).__name__}")
            first += len(batch)
            returns.append(results)
        if failures:
            raise SweepFailed(failures)
        return returns

