"""The data sets of the runner: small ones as tensors on the training device (arrays), image folders through
DataLoader workers (images), and the batches of both as one DeviceData."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from .arrays import DATASETS, SPLITS, DataError, DataNotFoundError, DataSplits, data_shape, iterate_batches, load_data
from .images import IMAGE_DATASETS, IMAGE_SHAPES

__all__ = ["DATASETS", "SPLITS", "IMAGE_DATASETS", "DataError", "DataNotFoundError", "DataSplits", "DeviceData",
           "data_shape", "input_spec", "iterate_batches", "load_data", "load_device_data"]


def synthetic_options(data_cfg) -> dict:
    if data_cfg.name != "synthetic":
        return {}
    keys = ("input_shape", "num_classes", "n_train", "n_val", "n_test", "noise")
    return {k: tuple(data_cfg[k]) if k == "input_shape" else data_cfg[k] for k in keys if k in data_cfg}


def input_spec(data_cfg) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of the configured data set, without loading it (an image folder's classes are
    counted when it is loaded: DeviceData.num_classes)."""
    if data_cfg.name in IMAGE_DATASETS:
        return IMAGE_SHAPES[data_cfg.name]
    return data_shape(data_cfg.name, **synthetic_options(data_cfg))


@dataclass
class DeviceData:
    """Batches on the training device, whether the data set lives there whole or comes from loaders."""

    input_shape: tuple[int, ...]
    num_classes: int
    train_batches: Callable  # (generator) -> one epoch of shuffled batches
    batches_per_epoch: int
    eval_batches: dict[str, Callable[[], Iterable]]  # "val", "test"


def load_device_data(cfg, device) -> DeviceData:
    """The configured data set as batches on `device`; small data sets live there as one tensor and batches are
    index slices (DESIGN.md)."""
    data_cfg = cfg.data
    if data_cfg.name in IMAGE_DATASETS:
        from .images import load_image_data

        loaders = load_image_data(data_cfg.name, data_cfg.root, cfg.seed, cfg.batch_size, cfg.eval_batch_size,
                                  data_cfg.workers, data_cfg.subset)
        to_device = lambda loader: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
        return DeviceData(loaders.input_shape, loaders.num_classes, lambda generator: to_device(loaders.train),
                          len(loaders.train), {"val": lambda: to_device(loaders.val), "test": lambda: to_device(loaders.test)})
    data = load_data(data_cfg.name, data_cfg.get("root", "data"), data_cfg.get("split", "standard"), cfg.seed,
                     data_cfg.subset, **synthetic_options(data_cfg))
    tensors = {name: (split.x.to(device), split.y.to(device))
               for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    size = cfg.eval_batch_size
    chunks = lambda x, y: ((x[i : i + size], y[i : i + size]) for i in range(0, len(x), size))
    return DeviceData(
        data.input_shape, data.num_classes,
        lambda generator: iterate_batches(*tensors["train"], cfg.batch_size, shuffle=True, generator=generator),
        math.ceil(len(data.train.x) / cfg.batch_size),
        {name: (lambda name=name: chunks(*tensors[name])) for name in ("val", "test")},
    )
