"""Data sets as whole CPU tensors, split the standard way or the paper's way.

MNIST and Fashion-MNIST are small enough to live as one tensor on the training device, so there
is no DataLoader: ``load_data`` returns float32 images in [0, 1] and int64 labels, and
sharding.tensor_batches yields index slices of them.

Where MNIST and Fashion-MNIST come from is data.sources; synthetic data are class-mean images plus noise,
generated from the seed (for tests and smoke runs).

Splits of the 70k-image sets:

- standard: official training images 0..49999 -> train, 50000..59999 -> val, official test -> test.
- paper: pool all 70000, then a stratified re-split drawn from ``seed`` into 60000 train+val /
  10000 test, and the 60000 again into 50000 train / 10000 val (PAPER.md section 2).
- train_test: the paper split's 60000 / 10000 without a validation set: all 60000 train (the authors'
  DLRT vs U V^T runs, UV_vanilla/*_factorization_run.py of the published code). The val split is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import sources
from .errors import DataError

DATASETS = ("mnist", "fashion_mnist", "synthetic")
SPLITS = ("standard", "paper", "train_test")

# Held out of the 60000 official training images (standard) or of the 70000 pooled (paper).
N_VAL = 10_000
N_TEST = 10_000

_SYNTHETIC_DEFAULTS = {
    "input_shape": (1, 28, 28),
    "num_classes": 10,
    "n_train": 512,
    "n_val": 128,
    "n_test": 128,
    "noise": 0.5,  # std of the Gaussian noise around each class mean
}


@dataclass
class Split:
    """One part of a data set, CPU tensors."""

    x: torch.Tensor  # float32 images (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 labels (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]  # e.g. (1, 28, 28)
    num_classes: int


def load_data(
    name: str,
    root: str | Path = "data",
    split: str = "standard",
    seed: int = 0,
    subset: int | None = None,
    **synthetic_kwargs,
) -> DataSplits:
    """Load data set ``name`` split into train/val/test.

    ``split`` is "standard" or "paper" (ignored for synthetic); ``seed`` draws the paper split and
    the synthetic data; ``subset=N`` keeps only the first N training examples, for quick runs.
    ``synthetic_kwargs`` (input_shape, num_classes, n_train, n_val, n_test, noise) shape the
    synthetic data and are refused for the real data sets.
    """
    # Refuse bad arguments before any (possibly slow) loading.
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if subset is not None and subset <= 0:
        raise DataError(f"subset must be a positive number of training examples, got {subset}")
    if synthetic_kwargs and name != "synthetic":
        raise DataError(
            f"options {sorted(synthetic_kwargs)} apply only to the synthetic data set, not {name!r}"
        )

    if name == "synthetic":
        splits = _synthetic(seed, **synthetic_kwargs)
    else:
        root = Path(root)
        raw = sources.mnist_raw(root) if name == "mnist" else sources.fashion_mnist_raw(root)
        splits = _split_official(raw, split, seed)
    if subset is not None:
        splits.train = Split(splits.train.x[:subset].clone(), splits.train.y[:subset].clone())
    return splits


def data_shape(name: str, **synthetic_kwargs) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of a data set without loading it, to check a model against it."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if name == "synthetic":
        opts = {**_SYNTHETIC_DEFAULTS, **synthetic_kwargs}
        return tuple(int(s) for s in opts["input_shape"]), int(opts["num_classes"])
    return (1, 28, 28), 10


# --- splitting -------------------------------------------------------------------------------


def _split_official(raw: dict[str, torch.Tensor], split: str, seed: int) -> DataSplits:
    """Turn official train/test uint8 tensors into train/val/test Splits."""
    if split == "standard":
        n_train = len(raw["train_y"]) - N_VAL
        parts = [
            (raw["train_x"][:n_train], raw["train_y"][:n_train]),
            (raw["train_x"][n_train:], raw["train_y"][n_train:]),
            (raw["test_x"], raw["test_y"]),
        ]
    else:
        x = torch.cat([raw["train_x"], raw["test_x"]])
        y = torch.cat([raw["train_y"], raw["test_y"]])
        train, val, test = _paper_indices(y, seed)
        if split == "train_test":  # the same test set as the paper split's, and no validation set
            train, val = torch.cat([train, val]), val[:0]
        parts = [(x[idx], y[idx]) for idx in (train, val, test)]
    train, val, test = (Split(_to_float(px), py) for px, py in parts)
    return DataSplits(train, val, test, input_shape=(1, 28, 28), num_classes=10)


def _paper_indices(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the paper's stratified train/val/test re-split of the pooled labels ``y``."""
    g = torch.Generator().manual_seed(seed)
    trainval, test = _stratified_split(y, len(y) - N_TEST, g)
    train, val = _stratified_split(y[trainval], len(trainval) - N_VAL, g)
    return trainval[train], trainval[val], test


def _stratified_split(
    y: torch.Tensor, n_first: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of ``y`` into exactly ``n_first`` and the rest, each class in proportion.

    Each class gets the floor of its proportional share of ``n_first``; the seats left over go to
    the classes with the largest remainders (largest-remainder rounding), so sizes are exact and
    no class is off its share by a whole example.
    """
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts * n_first  # share * len(y), kept in integers so rounding is exact
    take = exact // len(y)
    leftover = n_first - int(take.sum())
    take[torch.argsort(exact % len(y), descending=True, stable=True)[:leftover]] += 1

    first, rest = [], []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        first.append(idx[:k])
        rest.append(idx[k:])
    first, rest = torch.cat(first), torch.cat(rest)
    # Shuffle across classes, else a part is sorted by class and subset= would take only class 0.
    return (
        first[torch.randperm(len(first), generator=generator)],
        rest[torch.randperm(len(rest), generator=generator)],
    )


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return pixels.unsqueeze(1).to(torch.float32).div_(255)


# --- synthetic -------------------------------------------------------------------------------


def _synthetic(seed: int, **kwargs) -> DataSplits:
    """Learnable random data: per-class mean images (fixed by seed) plus Gaussian noise in [0, 1]."""
    unknown = sorted(set(kwargs) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(f"unknown synthetic options {unknown}; known: {', '.join(_SYNTHETIC_DEFAULTS)}")
    opts = {**_SYNTHETIC_DEFAULTS, **kwargs}
    shape = tuple(int(s) for s in opts["input_shape"])
    num_classes = int(opts["num_classes"])
    sizes = [int(opts[k]) for k in ("n_train", "n_val", "n_test")]
    if not shape or min(shape) < 1 or num_classes < 2 or min(sizes) < 0 or opts["noise"] < 0:
        raise DataError(
            "synthetic needs input_shape of positive sizes, num_classes >= 2, n_train/n_val/n_test >= 0 "
            f"and noise >= 0; got input_shape={shape}, num_classes={num_classes}, sizes={sizes}, "
            f"noise={opts['noise']}"
        )

    g = torch.Generator().manual_seed(seed)
    means = torch.rand((num_classes, *shape), generator=g)

    def draw(n: int) -> Split:
        y = torch.randint(num_classes, (n,), generator=g)
        x = means[y] + opts["noise"] * torch.randn((n, *shape), generator=g)
        return Split(x.clamp_(0, 1), y)

    train, val, test = (draw(n) for n in sizes)
    return DataSplits(train, val, test, input_shape=shape, num_classes=num_classes)
