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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .arrays import DataError, DataNotFoundError

IMAGE_DATASETS = ("cifar10", "imagenet")
IMAGE_SHAPES = {"cifar10": ((3, 32, 32), 10), "imagenet": ((3, 224, 224), 1000)}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class LoaderSplits:
    train: DataLoader
    val: DataLoader
    test: DataLoader
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


def load_image_data(name: str, root: str | Path, seed: int, batch_size: int, eval_batch_size: int,
                    workers: int = 4, subset: int | None = None) -> LoaderSplits:
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    train, val, test, num_classes = (_cifar10 if name == "cifar10" else _imagenet)(Path(root), seed)
    if subset is not None:
        train = Subset(train, range(min(subset, len(train))))
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return LoaderSplits(
        DataLoader(train, batch_size, shuffle=True, drop_last=False, generator=generator, **common),
        DataLoader(val, eval_batch_size, **common),
        DataLoader(test, eval_batch_size, **common),
        IMAGE_SHAPES[name][0], num_classes,
    )
