"""One job of dlrt-run: check its config, name its run folder, skip or resume it, train it, and turn every way it
can fail into an error that says in one line what happened and what to do."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .run_folder import RunFolder, RunFolderError
from .schema import flatten, used
from .validate import ConfigError, one_line, validate

GROUPS = ("model", "data", "method", "optim")
NAMED = ("model.name", "data.name", "method.name", "tau", "seed")  # in the folder's base name
# Keys that do not change what a run computes: never in a folder's name, so that moving the data, running on
# another device or with other threads finds the same folder (and resumes it).
NOT_IN_NAME = ("out_dir", "progress", "device", "eval_batch_size", "threads", "flush_denormal", "svd_on",
               "cuda_graphs", "data.root", "data.workers")


class UserError(RuntimeError):
    """Something the user can fix (data not found, a folder in use, a checkpoint that cannot be read): exit 2."""


class RunFailed(RuntimeError):
    """Training failed (the loss diverged, or a factorisation of the step did); the run folder says so: exit 1."""


def run_job(cfg: DictConfig) -> dict | None:
    """Train the run `cfg` describes, or skip it when its folder says it is done. Returns its summary."""
    validate(cfg)
    folder = _find_folder(cfg)
    try:
        summary = folder.summary()
        if folder.file("config.yaml").exists():
            _check_same_run(folder, cfg)
    except RunFolderError as e:
        raise UserError(str(e)) from None
    if summary is not None:
        said = "already finished" if summary["status"] == "completed" else f"it failed before ({summary.get('reason')})"
        print(f"skipping {folder}: {said}; delete the folder to run it again", file=sys.stderr)
        return summary
    from torch.linalg import LinAlgError

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
    except LinAlgError as e:  # non-finite factors reached a QR or SVD before they reached the loss
        reason = f"a factorisation of the step failed ({one_line(e)[:120]}): the factors became non-finite"
        if main:
            folder.write_summary({"status": "failed", "reason": reason, "model": cfg.model.name,
                                  "method": cfg.method.name, "tau": cfg.tau, "seed": cfg.seed})
        raise RunFailed(f"{folder} failed: {reason}; a smaller lr may train") from None
    if main:
        best = summary["selected"]
        print(f"done: {folder}\n  selected epoch {best['epoch']} ({summary['selection']}): test acc "
              f"{best['test_acc']:.2f}%, ranks [{best['ranks']}], c.r. eval {best['cr_eval_honest']:.1f}% honest / "
              f"{best['cr_eval_paper']:.1f}% paper convention, {summary['seconds_per_epoch']:.1f} s per epoch",
              file=sys.stderr)
    return summary


def _find_folder(cfg: DictConfig) -> RunFolder:
    """The run's folder: the one run_name names, or, when only an older version's name for the run exists, that one."""
    names = folder_names(cfg, run_name(cfg))
    existing = [name for name in names if (Path(cfg.out_dir) / name).is_dir()]
    return RunFolder(Path(cfg.out_dir) / (existing or names)[0])


def folder_names(cfg: DictConfig, name: str) -> list[str]:
    """run_name first, then the name of the same run by earlier versions: before the schema made ϑ a float, an
    integral ϑ given as `tau=0` was named tau0, not tau0.0."""
    names = [name]
    if float(cfg.tau).is_integer():
        names.append(name.replace(f"-tau{cfg.tau}-seed", f"-tau{int(cfg.tau)}-seed", 1))
    return list(dict.fromkeys(names))


def config_differences(recorded: dict, cfg: DictConfig) -> list[tuple[str, object, object]]:
    """(key, recorded value, this config's value) for every setting that changes what a run computes and that
    both hold (a key that only one of them has came or went with a default that keeps the behaviour, or is one the
    run does not read: older folders record those too)."""
    ours, theirs = _flat(cfg), flatten(recorded)
    return [(key, theirs[key], value) for key, value in ours.items()
            if key in theirs and key not in NOT_IN_NAME and theirs[key] != value]


def _check_same_run(folder: RunFolder, cfg: DictConfig) -> None:
    """A folder whose config.yaml differs from the command (edited by hand, or a name two settings share) is
    neither skipped nor resumed: its records would be filed under settings they were not trained with."""
    differences = config_differences(folder.config(), cfg)
    if differences:
        key, recorded, value = differences[0]
        more = f" (and {len(differences) - 1} more setting(s))" if len(differences) > 1 else ""
        raise UserError(f"{folder} holds another run: {key}={_text(recorded)} in its config.yaml, {_text(value)} in "
                        f"this command{more}; delete the folder or choose another out_dir to run this one")


def run_name(cfg: DictConfig) -> str:
    """<model>-<data>-<method>[+<finetune method><epochs>]-tau<ϑ>-seed<seed>[_<key=value,...>], under the
    experiment's folder when one is chosen. The name follows the resolved settings, not the words of the command:
    model, data and method are the options of ours that the run's groups are (a user's own option, `-cd myconf
    method=myadapt`, is the option of ours it extends), and the extras are every group choice and value in which
    the run differs from the defaults of its model, data, method and experiment, except those of NOT_IN_NAME. So a
    value given that equals the default (lr=0.05 on LeNet5) makes no new folder, a user's option that changes r_min
    is named by it, and a key the run does not read (schema.unused_keys: scheduler.factor without a scheduler) names
    nothing. ϑ stays in every name, as the names of the run records have it."""
    from .runtime import phases

    ours = {group: cfg[group].name for group in GROUPS}
    method = ours["method"]
    parts = phases(cfg)
    if len(parts) > 1:
        method += f"+{parts[1][1]}{parts[1][2]}"
    name = f"{ours['model']}-{ours['data']}-{method}-tau{cfg.tau}-seed{cfg.seed}"
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    experiment = None if experiment in (None, "null") else experiment
    base = [f"{group}={ours[group]}" for group in ("model", "data", "method")]
    base += [f"experiment={experiment}"] if experiment else []
    defaults = compose("config", overrides=base)
    extras = [f"{group}={ours[group]}" for group in GROUPS if defaults[group].name != ours[group]]
    reference = _flat(compose("config", overrides=base + [f"{group}={ours[group]}" for group in GROUPS
                                                          if group not in ("model", "data", "method")]))
    for key, value in _flat(cfg).items():
        if key not in NAMED and key not in NOT_IN_NAME and reference.get(key, object()) != value:
            extras.append(f"{key}={_text(value)}")
    if extras:
        name += "_" + ",".join(sorted(extras))
    name = _fit(re.sub(r"[^A-Za-z0-9_.,=+\[\]-]", "_", name))
    return f"{experiment}/{name}" if experiment else name


def _fit(name: str, limit: int = 255) -> str:
    """A name the file system takes (at most 255 bytes): a longer one keeps its start and ends with a hash of the
    whole, so that two long names still differ."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[:limit - len(digest) - 1]}~{digest}"


def _flat(cfg: DictConfig) -> dict:
    """The settings the run reads, flattened."""
    return used(flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


def _text(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


__all__ = ["ConfigError", "RunFailed", "UserError", "run_job", "run_name"]
