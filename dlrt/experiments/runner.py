"""One job of dlrt-run: check its config, name its run folder, skip or resume it, train it, and turn every way it
can fail into an error that says in one line what happened and what to do."""

from __future__ import annotations

import contextlib
import os
import re
import sys

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .run_folder import RunFolder, RunFolderError
from .validate import ConfigError, validate

GROUPS = ("model", "data", "method", "optim")
NAMED = ("model.name", "data.name", "method.name", "tau", "seed")  # in the folder's base name
# Keys that do not change what a run computes: never in a folder's name, so that moving the data, running on
# another device or with other threads finds the same folder (and resumes it).
NOT_IN_NAME = ("out_dir", "progress", "device", "eval_batch_size", "threads", "flush_denormal", "svd_on",
               "cuda_graphs", "data.root", "data.workers")


class UserError(RuntimeError):
    """Something the user can fix (data not found, a folder in use, a checkpoint that cannot be read): exit 2."""


class RunFailed(RuntimeError):
    """Training failed (the loss diverged); the run folder says so: exit 1."""


def run_job(cfg: DictConfig) -> dict | None:
    """Train the run `cfg` describes, or skip it when its folder says it is done. Returns its summary."""
    validate(cfg)
    folder = RunFolder(f"{cfg.out_dir}/{run_name(cfg)}")
    try:
        summary = folder.summary()
    except RunFolderError as e:
        raise UserError(str(e)) from None
    if summary is not None:
        said = "already finished" if summary["status"] == "completed" else f"it failed before ({summary.get('reason')})"
        print(f"skipping {folder}: {said}; delete the folder to run it again", file=sys.stderr)
        return summary
    from .data import DataError
    from .models import ModelError
    from .train import TrainingDiverged, train

    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 owns and writes the folder
    if main:
        print(f"run folder: {folder}", file=sys.stderr)
    try:
        with folder.claim() if main else contextlib.nullcontext():
            summary = train(cfg, folder)
    except (DataError, ModelError, RunFolderError) as e:
        raise UserError(str(e)) from None
    except TrainingDiverged as e:
        raise RunFailed(f"{folder} failed: {e}") from None
    if main:
        best = summary["selected"]
        print(f"done: {folder}\n  selected epoch {best['epoch']} ({summary['selection']}): test acc "
              f"{best['test_acc']:.2f}%, ranks [{best['ranks']}], c.r. eval {best['cr_eval_honest']:.1f}% honest / "
              f"{best['cr_eval_paper']:.1f}% paper convention, {summary['seconds_per_epoch']:.1f} s per epoch",
              file=sys.stderr)
    return summary


def run_name(cfg: DictConfig) -> str:
    """<model>-<data>-<method>[+<finetune method><epochs>]-tau<ϑ>-seed<seed>[_<key=value,...>] (model and data as
    chosen, so a user's own config option gets folders of its own), under the
    experiment's folder when one is chosen. The extras are every group choice and value in which the run differs
    from the defaults of its model, data, method and experiment, except those of NOT_IN_NAME: so a value given
    that equals the default (lr=0.05 on LeNet5) does not make a new folder."""
    from .runtime import phases

    method = cfg.method.name
    parts = phases(cfg)
    if len(parts) > 1:
        method += f"+{parts[1][1]}{parts[1][2]}"
    choices = HydraConfig.get().runtime.choices  # a user's own option (-cd) is named by its file, not its base's name
    name = f"{choices['model']}-{choices['data']}-{method}-tau{cfg.tau}-seed{cfg.seed}"
    base = [f"{group}={choices[group]}" for group in ("model", "data", "method", "experiment")
            if choices.get(group) not in (None, "null")]
    extras = []
    defaults = compose("config", overrides=base, return_hydra_config=True)
    for group in GROUPS:
        if choices.get(group) != defaults.hydra.runtime.choices.get(group):
            extras.append(f"{group}={choices[group]}")
    reference = compose("config", overrides=base + [f"{group}={choices[group]}" for group in GROUPS
                                                    if f"{group}={choices[group]}" not in base])
    ours, theirs = _flat(cfg), _flat(reference)
    for key, value in ours.items():
        if key not in NAMED and key not in NOT_IN_NAME and theirs.get(key, object()) != value:
            extras.append(f"{key}={_text(value)}")
    if extras:
        name += "_" + ",".join(sorted(extras))
    name = re.sub(r"[^A-Za-z0-9_.,=+\[\]-]", "_", name)
    experiment = choices.get("experiment")
    return f"{experiment}/{name}" if experiment not in (None, "null") else name


def _flat(cfg: DictConfig) -> dict:
    return {key: value for key, value in _walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))}


def _walk(tree, prefix: str = ""):
    for key, value in tree.items():
        if key == "hydra":
            continue
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", tuple(value) if isinstance(value, list) else value


def _text(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


__all__ = ["ConfigError", "RunFailed", "UserError", "run_job", "run_name"]
