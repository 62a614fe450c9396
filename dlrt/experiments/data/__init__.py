"""The data sets of the runner: small ones as tensors on the training device (arrays), image folders through
DataLoader workers (images), and the batches of both as one DeviceData. Both go through one sampling rule
(sharding): in a data-parallel run each worker reads only its own part of every epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .arrays import DATASETS, SPLITS, DataSplits, data_shape, load_data
from .errors import DataError, DataNotFoundError
from .images import IMAGE_DATASETS, IMAGE_SHAPES
from .sharding import Batch, EpochPlan, Shard, tensor_batches, tensor_chunks

__all__ = ["DATASETS", "SPLITS", "IMAGE_DATASETS", "Batch", "DataError", "DataNotFoundError", "DataSplits",
           "DeviceData", "EpochPlan", "Shard", "data_shape", "input_spec", "load_data", "load_device_data"]


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
    """This worker's batches on the training device, whether the data set lives there whole or comes from
    loaders (sharding says which examples are this worker's)."""

    input_shape: tuple[int, ...]
    num_classes: int
    train_batches: Callable[..., Iterator[Batch]]  # (generator) -> this worker's batches of one shuffled epoch
    batches_per_epoch: int  # global batches: the steps of an epoch, the same on every worker
    eval_batches: dict[str, Callable[[], Iterable]]  # "val", "test": this worker's block, as (x, y)
    shard: Shard = field(default_factory=Shard)


def load_device_data(cfg, device, workers=None) -> DeviceData:
    """The configured data set as this worker's batches on `device` (`workers`: a runtime.Workers, None for one
    process). Small data sets live there as one tensor and batches are index slices (DESIGN.md)."""
    data_cfg, shard = cfg.data, Shard.of(workers)
    if data_cfg.name in IMAGE_DATASETS:
        from .images import ImageBatches, eval_loader, load_image_splits

        splits = load_image_splits(data_cfg.name, data_cfg.root, cfg.seed, data_cfg.subset)
        train = ImageBatches(splits.train, cfg.batch_size, shard, splits.input_shape, device, data_cfg.workers,
                             cfg.seed)
        loaders = {name: eval_loader(getattr(splits, name), cfg.eval_batch_size, shard, device, data_cfg.workers,
                                     cfg.seed) for name in ("val", "test")}
        to_device = lambda loader: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                                    for x, y in loader)
        return DeviceData(splits.input_shape, splits.num_classes, train.epoch, len(train),
                          {name: (lambda name=name: to_device(loaders[name])) for name in loaders}, shard)
    data = load_data(data_cfg.name, data_cfg.get("root", "data"), data_cfg.get("split", "standard"), cfg.seed,
                     data_cfg.subset, **synthetic_options(data_cfg))
    tensors = {name: (split.x.to(device), split.y.to(device))
               for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    return DeviceData(
        data.input_shape, data.num_classes,
        lambda generator: tensor_batches(*tensors["train"], cfg.batch_size, generator, shard),
        math.ceil(len(data.train.x) / cfg.batch_size),
        {name: (lambda name=name: tensor_chunks(*tensors[name], cfg.eval_batch_size, shard)) for name in ("val", "test")},
        shard,
    )
