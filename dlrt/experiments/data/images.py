"""Image-folder data sets read by DataLoader workers: CIFAR-10 and ImageNet (PAPER.md §2).

Unlike MNIST these do not fit on the device as one tensor, and they are augmented per epoch. Neither
can be downloaded on an offline machine: they are read from the user's root, and a missing root gives
an error that says which layout is expected.

- cifar10: torchvision's CIFAR-10 under <root> (downloaded there when online). The 50000 training
  images are split, by the seed, into 45000 train / 5000 val; the 10000 test images are the test set.
  Training transform RandomCrop(32, 4) + horizontal flip.
- imagenet: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (ImageFolder). 10000 training
  images, drawn by the seed, are held out for validation (model selection); val/ is the test set.
  RandomResizedCrop(224) + flip for training, Resize(256) + CenterCrop(224) for evaluation.

Each worker of a data-parallel run reads and decodes only its own images (dlrt.experiments.data.sharding): its
training DataLoader takes its batches from a ShardBatchSampler, its evaluation loaders read its block of the
val and test sets. `workers` DataLoader processes serve each training process; memory is pinned when the
process trains on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .errors import DataError, DataNotFoundError
from .sharding import Batch, EpochPlan, Shard

IMAGE_DATASETS = ("cifar10", "imagenet")
IMAGE_SHAPES = {"cifar10": ((3, 32, 32), 10), "imagenet": ((3, 224, 224), 1000)}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageSplits:
    train: Dataset  # with the training transform
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def _held_out(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val:], order[:n_val]


def _cifar10(root: Path, seed: int):
    import torchvision
    from torchvision import transforms as T

    normalize = T.Normalize(_CIFAR_MEAN, _CIFAR_STD)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.ToTensor(), normalize])
    try:
        make = lambda train, tf: torchvision.datasets.CIFAR10(root, train=train, transform=tf, download=True)
        train_aug, train_plain, test = make(True, train_tf), make(True, eval_tf), make(False, eval_tf)
    except (RuntimeError, OSError) as e:
        raise DataNotFoundError(
            f"CIFAR-10 is not under {root} and could not be downloaded ({e}); put torchvision's "
            f"'cifar-10-batches-py' folder (from cifar-10-python.tar.gz) under {root}, or set data.root"
        ) from None
    train_idx, val_idx = _held_out(len(train_aug), 5000, seed)
    return Subset(train_aug, train_idx), Subset(train_plain, val_idx), test, 10


def _imagenet(root: Path, seed: int):
    from torchvision import datasets, transforms as T

    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataNotFoundError(
                f"ImageNet needs {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (ImageFolder "
                f"layout, one folder per class, the same class folders in both); {root / part} is missing"
            )
    normalize = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train_aug = datasets.ImageFolder(root / "train", train_tf)
    train_plain = datasets.ImageFolder(root / "train", eval_tf)
    test = datasets.ImageFolder(root / "val", eval_tf)
    if train_aug.classes != test.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders")
    train_idx, val_idx = _held_out(len(train_aug), min(10000, len(train_aug) // 10), seed)
    return Subset(train_aug, train_idx), Subset(train_plain, val_idx), test, len(train_aug.classes)


def load_image_splits(name: str, root: str | Path, seed: int, subset: int | None = None) -> ImageSplits:
    """The three parts of an image data set as torch Datasets (nothing is read but the folder listings)."""
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    train, val, test, num_classes = (_cifar10 if name == "cifar10" else _imagenet)(Path(root), seed)
    if subset is not None:
        train = Subset(train, range(min(subset, len(train))))
    return ImageSplits(train, val, test, IMAGE_SHAPES[name][0], num_classes)


class SeededSamples(Dataset):
    """dataset[(i, seed)] is dataset[i] with torch's CPU generator seeded by `seed` while the transform draws, and
    restored afterwards: an example's random crop and flip depend on the epoch's seed and i only, not on the
    process or DataLoader worker that reads it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed seeds GPUs too)
            return self.dataset[index]


class ShardBatchSampler(Sampler):
    """This worker's batches of the current epoch's plan, as lists of (index, seed) for SeededSamples. A worker
    whose shard of a batch is empty gets no list for it (ImageBatches steps on a stand-in instead)."""

    def __init__(self):
        self.plan: EpochPlan | None = None

    def __iter__(self):
        plan = self.plan
        for b in range(len(plan)):
            mine = plan.mine(b).tolist()
            if mine:
                yield [(i, plan.sample_seed(i)) for i in mine]

    def __len__(self) -> int:
        return sum(1 for b in range(len(self.plan)) if len(self.plan.mine(b))) if self.plan is not None else 0


def loader_options(workers: int, device: torch.device, seed: int) -> dict:
    """DataLoader settings of one training process: its own `workers` processes, pinned memory on a GPU, and a
    private generator (DataLoader draws its workers' base seed from it, not from torch's global RNG)."""
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(seed))


class ImageBatches:
    """One worker's training batches of an image data set, epoch by epoch, on `device`."""

    def __init__(self, dataset: Dataset, batch_size: int, shard: Shard, input_shape, device: torch.device,
                 workers: int, seed: int):
        self.n, self.batch_size, self.shard = len(dataset), batch_size, shard
        self.input_shape, self.device = tuple(input_shape), device
        self.sampler = ShardBatchSampler()
        self.loader = DataLoader(SeededSamples(dataset), batch_sampler=self.sampler,
                                 **loader_options(workers, device, seed))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        plan = EpochPlan.draw(self.n, self.batch_size, generator, self.shard, augment=True)
        self.sampler.plan = plan
        loaded = iter(self.loader)
        for b in range(len(plan)):
            count = len(plan.mine(b))
            if count == 0:
                x = torch.zeros((1, *self.input_shape), device=self.device)
                yield Batch(x, torch.zeros(1, dtype=torch.long, device=self.device), 0, 1)
                continue
            x, y = next(loaded)
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), count,
                        plan.global_count(b))
        for _ in loaded:  # the loader ends with the plan
            raise RuntimeError("the DataLoader gave more batches than the epoch's plan holds")


def eval_loader(dataset: Dataset, batch_size: int, shard: Shard, device: torch.device, workers: int,
                seed: int) -> DataLoader:
    """This worker's contiguous block of an evaluation set, in order."""
    return DataLoader(Subset(dataset, shard.block(len(dataset))), batch_size, **loader_options(workers, device, seed))


def write_image_folder(root: str | Path, classes: int = 2, train_per_class: int = 16, val_per_class: int = 4,
                       size: int = 16, seed: int = 0, suffix: str = ".png") -> Path:
    """Generate a small data set in ImageNet's layout, <root>/train/<class>/*.png and <root>/val/<class>/*.png
    (class-coloured images plus noise, learnable), for tests, smoke runs (data=imagenet data.root=<root>) and the
    input-pipeline benchmark. `suffix` ".jpg" writes JPEGs, as ImageNet's are. Returns root."""
    import numpy as np
    from PIL import Image

    root, rng = Path(root), np.random.default_rng(seed)
    colours = rng.uniform(0, 255, (classes, 3))
    for part, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / part / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colours[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{part}_{c:03d}_{i:05d}{suffix}")
    return root
