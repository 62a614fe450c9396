"""Every check of a run's config that can be made before any work: each failure is a ConfigError with one line
that names the key and says what to do. Nothing here makes a folder or reads a data set."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import METHODS, RunSchema, group_schema

GROUPS = ("model", "data", "method", "optim")
FLOAT32_MAX = 3.4028234663852886e38  # a larger value becomes inf in the float32 arithmetic of training
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: smaller ones are flushed to 0 on a CPU
INT64_MAX = 2**63 - 1  # torch's sizes, seeds and counters
MAX_EPOCHS = 1_000_000  # the trainer plans every epoch ahead: more is a typo, not a run
DOCS = "docs/runner.md lists the keys"


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def validate(cfg: DictConfig) -> None:
    """Refuse a config that cannot run, before anything is made or loaded."""
    check_keys(cfg)
    _check_representable(cfg)
    _check_numbers(cfg)
    _check_combinations(cfg)
    _check_model(cfg)
    _check_paths(cfg)


def one_line(error: Exception) -> str:
    """OmegaConf's and Hydra's multi-line messages on one line, with the key they name."""
    text = " ".join(str(error).split("\n")[0].split())
    key = getattr(error, "full_key", None)
    return f"{key}: {text}" if key and key not in text else text


def check_keys(cfg: DictConfig) -> None:
    """Every key is one the run reads, with a value of its type: the groups against their options' schemas."""
    top = set(cfg.keys()) - set(GROUPS) - {"hydra"}  # a sweep's job configs hold Hydra's node too
    unknown = sorted(top - set(RunSchema.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}: dlrt-run has no such setting ({DOCS})")
    if cfg.method.get("name") not in METHODS:
        raise ConfigError(f"method.name={cfg.method.get('name')}: choose one of {', '.join(METHODS)}")
    for group in GROUPS:
        node = cfg[group]
        for f in dataclasses.fields(group_schema(group, node.get("name"))):
            value = node.get(f.name)
            if f.type == "str" and value is not None and not isinstance(value, str):  # data.root=0 is the int 0
                raise ConfigError(f"{group}.{f.name}={value} must be text: quote it, {group}.{f.name}='{value}'")
        schema = OmegaConf.structured(group_schema(group, node.get("name")))
        extra = sorted(set(node.keys()) - set(schema.keys()))
        if extra:
            raise ConfigError(f"{group}.{extra[0]}: {group} {node.get('name')!r} has no such key, so it would be "
                              f"ignored; its keys are {', '.join(schema.keys())}")
        try:
            OmegaConf.merge(schema, node)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{group}.{one_line(e)}") from None


def _check_representable(cfg: DictConfig) -> None:
    """Every number a float32 tensor or an int64 can hold: inf, nan, lr=1e300 (inf in float32) and integers past
    int64 fail deep inside torch (an SVD that does not converge, an overflow while unpacking a size)."""
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ConfigError(f"{key}={value} is not a finite float32 number: give one of magnitude below 3.4e38")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise ConfigError(f"{key}={value} is larger than an int64 holds ({INT64_MAX})")


def _leaves(tree, prefix: str = ""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(tree, dict) else f"{prefix[:-1]}[{key}]"
        if key == "hydra":
            continue
        if isinstance(value, (dict, list)):
            yield from _leaves(value, f"{name}.")
        else:
            yield name, value


def _at_least(cfg, key: str, low, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:  # NaN too
        raise ConfigError(f"{key}={value} must be a number >= {low}" + (" or null" if allow_none else ""))


def _check_numbers(cfg: DictConfig) -> None:
    _check_optimizer_settings(cfg)
    for key in ("epochs", "batch_size", "eval_batch_size"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "threads", 1, allow_none=True)
    if cfg.threads is not None and cfg.threads > (os.cpu_count() or 1):
        raise ConfigError(f"threads={cfg.threads} is more than the {os.cpu_count()} CPU(s) of this machine: more "
                          "threads than cores only wait for each other")
    if cfg.epochs + max(cfg.finetune.epochs, 0) > MAX_EPOCHS:
        raise ConfigError(f"epochs={cfg.epochs} (+ finetune.epochs={cfg.finetune.epochs}) is more than "
                          f"{MAX_EPOCHS} epochs in all")
    _at_least(cfg, "finetune.epochs", 0)
    _at_least(cfg, "scheduler.patience", 0)
    _at_least(cfg, "data.subset", 1, allow_none=True)
    if not cfg.lr > 0:
        raise ConfigError(f"lr={cfg.lr} must be > 0")
    if not 0 < cfg.scheduler.factor < 1:
        raise ConfigError(f"scheduler.factor={cfg.scheduler.factor} must be in (0, 1): the lr is multiplied by it")
    optim, data = cfg.optim, cfg.data
    if optim.name == "adam":
        if not optim.eps >= FLOAT32_TINY:
            raise ConfigError(f"optim.eps={optim.eps} must be >= {FLOAT32_TINY:.3g}: a smaller one is 0 in float32, "
                              "and Adam divides by it")
    if data.name == "synthetic":
        if len(data.input_shape) != 3 or min(data.input_shape) < 1:
            raise ConfigError(f"data.input_shape={list(data.input_shape)} must be three positive sizes: channels, "
                              "height, width")
        _at_least(cfg, "data.num_classes", 2)
        for key in ("n_train", "n_test") + (("n_val",) if cfg.selection == "min_val_loss" else ()):
            _at_least(cfg, f"data.{key}", 1)
        _at_least(cfg, "data.noise", 0)
    if "workers" in data:
        _at_least(cfg, "data.workers", 0)
    if "width" in cfg.model:
        _at_least(cfg, "model.width", 1)


# DLRTOptimizer's settings by the config key that sets them (the others are named alike)
CONFIG_KEYS = {"absolute_tau": "method.absolute_tau", "r_min": "method.r_min", "r_max": "method.r_max",
               "state_policy": "method.state_policy", "basis_every": "method.basis_every",
               "momentum": "optim.momentum", "betas": "optim.betas", "eps": "optim.eps"}


def _check_optimizer_settings(cfg: DictConfig) -> None:
    """What DLRTOptimizer refuses (dlrt.optim.check_settings: its rules, written once), refused before any work,
    each message led by the config key and its value."""
    from dlrt.optim import check_settings  # torch: imported only when a run is checked, not for --help

    from .runtime import optimizer_settings

    settings = optimizer_settings(cfg, cfg.method.name)
    try:
        check_settings(**settings)
    except ValueError as error:
        message = str(error)
        named = [key for key in sorted(settings, key=len, reverse=True)
                 if message.startswith((f"{key} ", f"{key}=", f"an absolute {key} ", f"unknown {key} "))]
        if named:
            key = named[0]
            value = list(settings[key]) if isinstance(settings[key], tuple) else settings[key]
            raise ConfigError(f"{CONFIG_KEYS.get(key, key)}={value}: {message}") from None
        raise ConfigError(message) from None


def _check_combinations(cfg: DictConfig) -> None:
    method = cfg.method.name
    if method == "vanilla_frozen_convs" and (cfg.model.init != "authors" or cfg.model.spectrum is None):
        raise ConfigError("method=vanilla_frozen_convs is the published code's U V^T baseline: it needs "
                          "model.init=authors and a model.spectrum (one, pow2 or pow10)")
    no_validation = cfg.data.get("split") == "train_test"
    if no_validation and cfg.selection != "final":
        raise ConfigError("data.split=train_test has no validation set: set selection=final")
    if no_validation and cfg.scheduler.name == "plateau":
        raise ConfigError("scheduler.name=plateau steps on the validation loss, and data.split=train_test has none")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if cfg.cuda_graphs:
        if method == "fixed":
            raise ConfigError("cuda_graphs=true cannot graph method=fixed (its step takes a second pass): use "
                              "adaptive, parallel or vanilla, or cuda_graphs=false")
        if cfg.precision != "fp32":
            raise ConfigError("cuda_graphs=true is for precision=fp32 only (autocast inside a graph is not tested)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("cuda_graphs=true runs in one process only for now: drop torchrun or set cuda_graphs=false")
        from .devices import resolve_device

        if resolve_device(cfg.device).type != "cuda":
            raise ConfigError("cuda_graphs=true needs a CUDA device (device=cuda): on a CPU a training step is not "
                              "bound by kernel launches, so there is nothing for graphs to save")


def _check_model(cfg: DictConfig) -> None:
    """Build the model on the meta device: ranks and shapes are checked without any arithmetic."""
    import torch

    from .data import DataError, input_spec
    from .models import ModelError
    from .runtime import make_model

    try:
        input_shape, num_classes = input_spec(cfg.data)
        with torch.device("meta"):
            model = make_model(cfg, input_shape, num_classes)
    except (ModelError, DataError) as e:
        raise ConfigError(str(e)) from None
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # torch refusing a size
        raise ConfigError(f"the model cannot be built at these sizes ({one_line(e)[:150]}): "
                          f"check model.width, data.input_shape and data.num_classes") from None
    _check_memory(cfg, sum(p.numel() for p in model.parameters()), input_shape)


def _check_memory(cfg: DictConfig, parameters: int, input_shape) -> None:
    """The model's float32 parameters and a generated data set must fit the machine's memory, at the least."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    data = cfg.data
    if data.name == "synthetic":
        examples = data.n_train + data.n_val + data.n_test
        needed = 4 * examples * math.prod(input_shape)
        if needed > memory:
            raise ConfigError(f"data.n_train, n_val, n_test and input_shape ask for {needed / 2**30:.0f} GiB of "
                              f"generated data, more than this machine's {memory / 2**30:.0f} GiB")
    if 4 * parameters > memory:
        raise ConfigError(f"the model has {parameters:.3g} parameters ({4 * parameters / 2**30:.0f} GiB in float32), "
                          f"more than this machine's {memory / 2**30:.0f} GiB: check model.width, model.rank and "
                          "data.input_shape")


def _check_paths(cfg: DictConfig) -> None:
    """out_dir must be a folder this process can write, or one it can make; an image data set's root must exist
    (a download goes only into an existing folder, so a mistyped root is not made)."""
    for key in ("out_dir", "data.root"):
        value = OmegaConf.select(cfg, key)
        value = None if value is None else str(value)  # data.root=0 composes to an int
        if value is not None and not value.strip():
            raise ConfigError(f"{key} is empty: give a folder ('.' for this one)")
        if value is not None and max(len(part.encode()) for part in Path(value).parts) > 255:
            raise ConfigError(f"{key}={str(value)[:40]}...: a folder name longer than 255 bytes, which file systems "
                              "refuse")
    out = Path(str(cfg.out_dir))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir} is a file, not a folder: choose another out_dir")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir={cfg.out_dir}: {existing} cannot be written by this user: choose another out_dir")
    if cfg.data.name in ("cifar10", "imagenet") and not Path(str(cfg.data.root)).is_dir():
        raise ConfigError(f"data.root={cfg.data.root} is no folder: point it at the folder that holds "
                          f"{'cifar-10-batches-py' if cfg.data.name == 'cifar10' else 'train/ and val/'}")
