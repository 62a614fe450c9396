"""The paper's networks, dense or with their low-rank layers (PAPER.md §2): fc, lenet5, vgg16, resnet50.

    build_model("lenet5", input_shape=(1, 28, 28), num_classes=10, low_rank=True, rank=None)

`rank` sets the initial rank of every low-rank layer: None starts each at its largest adaptive rank
⌊min(n, m)/2⌋ (training then cuts it down to what ϑ asks), an int caps every layer at that rank, a
list gives one rank per low-rank layer. The output layer always stays dense, as in the paper.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torchvision
from torch import nn

from .convert import convert
from .layers import LowRankConv2d, LowRankLinear, low_rank_layers


class ModelError(ValueError):
    """A model cannot be built as asked; the message says why and what to do."""


class _Ranks:
    """Hands out initial ranks to the low-rank layers in the order they are built."""

    def __init__(self, rank: int | list[int] | None, count: int):
        if isinstance(rank, (list, tuple)) and len(rank) != count:
            raise ModelError(f"model.rank lists {len(rank)} ranks but the model has {count} low-rank layers")
        self.rank, self.index = rank, 0

    def next(self, n: int, m: int) -> int:
        rank = self.rank[self.index] if isinstance(self.rank, (list, tuple)) else self.rank
        self.index += 1
        if rank is None:
            return max(1, min(n, m) // 2)
        if not 1 <= rank:
            raise ModelError(f"model.rank must be >= 1, got {rank}")
        if isinstance(self.rank, (list, tuple)) and rank > min(n, m):
            raise ModelError(f"model.rank {rank} is larger than layer {self.index} allows ({n}x{m}: at most {min(n, m)})")
        return min(rank, min(n, m))


def _linear(n_in, n_out, low_rank, ranks: _Ranks | None):
    if not low_rank:
        return nn.Linear(n_in, n_out)
    return LowRankLinear(n_in, n_out, ranks.next(n_out, n_in))


def _conv(c_in, c_out, k, low_rank, ranks: _Ranks | None):
    if not low_rank:
        return nn.Conv2d(c_in, c_out, k)
    return LowRankConv2d(c_in, c_out, k, ranks.next(c_out, c_in * k * k))


def fc(input_shape, num_classes, low_rank=True, rank=None, width: int = 500, depth: int = 4) -> nn.Module:
    """784 -> width x depth -> 10 with ReLU; the `depth` hidden layers low-rank, the output dense."""
    ranks = _Ranks(rank, depth) if low_rank else None
    dims = [math.prod(input_shape)] + [width] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        layers += [_linear(n_in, n_out, low_rank, ranks), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape, num_classes, low_rank=True, rank=None) -> nn.Module:
    """conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc out; the first three low-rank."""
    channels, height, width = input_shape
    ranks = _Ranks(rank, 3) if low_rank else None
    side = lambda size: ((size - 4) // 2 - 4) // 2  # two 5x5 convs, each followed by a 2x2 pool
    flat = 50 * side(height) * side(width)
    return nn.Sequential(
        _conv(channels, 20, 5, low_rank, ranks), nn.ReLU(), nn.MaxPool2d(2),
        _conv(20, 50, 5, low_rank, ranks), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        _linear(flat, 500, low_rank, ranks), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def _convert_torchvision(net: nn.Module, low_rank: bool, rank) -> nn.Module:
    """Low-rank versions of all convs and linears but the first conv and the classifier (dlrt.convert)."""
    if not low_rank:
        return net
    if isinstance(rank, (list, tuple)):
        ranks = iter(rank)
        _, report = convert(net, rank=lambda name, n, m: next(ranks, 0))
        if len(report.converted) != len(rank) or any(e.rank == 0 for e in report.converted):
            raise ModelError(f"model.rank lists {len(rank)} ranks but the model has {len(report.converted)} low-rank layers")
        return net
    if rank is not None and not isinstance(rank, float) and rank < 1:
        raise ModelError(f"model.rank must be >= 1, got {rank}")
    return convert(net, rank=rank)[0]


def _first_conv_channels(net: nn.Module, conv_path: str, channels: int) -> None:
    """torchvision's nets take 3 channels; rebuild the first conv for any other number."""
    conv = net.get_submodule(conv_path)
    if channels != conv.in_channels:
        parent, _, child = conv_path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child,
                nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None))


def is_small_image(input_shape) -> bool:
    """CIFAR-sized inputs (32x32 or smaller) get the usual small-image variants of the ImageNet nets."""
    return max(input_shape[1:]) <= 32


def vgg16(input_shape, num_classes, low_rank=True, rank=None) -> nn.Module:
    """torchvision's VGG16; for 32x32 inputs its classifier is 512 -> 512 -> 512 -> classes after a 1x1 pool."""
    net = torchvision.models.vgg16(num_classes=num_classes)
    _first_conv_channels(net, "features.0", input_shape[0])
    if is_small_image(input_shape):
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, num_classes),
        )
    return _convert_torchvision(net, low_rank, rank)


def resnet50(input_shape, num_classes, low_rank=True, rank=None) -> nn.Module:
    """torchvision's ResNet-50; for 32x32 inputs a 3x3 stride-1 first conv and no max-pool."""
    net = torchvision.models.resnet50(num_classes=num_classes)
    if is_small_image(input_shape):
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    _first_conv_channels(net, "conv1", input_shape[0])
    return _convert_torchvision(net, low_rank, rank)


MODELS: dict[str, Callable[..., nn.Module]] = {"fc": fc, "lenet5": lenet5, "vgg16": vgg16, "resnet50": resnet50}

# Initial spectra of the paper's DLRT vs U V^T comparison: σ_k = 1, 2^-k or 10^-k (k = 0, 1, ...)
SPECTRA = {"one": 1.0, "pow2": 0.5, "pow10": 0.1}


@torch.no_grad()
def set_spectrum(model: nn.Module, spectrum: str) -> None:
    """Give every low-rank layer random orthonormal U, V and S = diag(ratio^k)."""
    for layer in low_rank_layers(model):
        U, S, V = layer.U, layer.S, layer.V
        sigma = SPECTRA[spectrum] ** torch.arange(layer.rank, dtype=S.dtype, device=S.device)
        layer.set_factors(torch.linalg.qr(torch.randn_like(U))[0], torch.diag(sigma), torch.linalg.qr(torch.randn_like(V))[0])


def build_model(name: str, input_shape, num_classes: int, low_rank: bool = True, rank=None,
                spectrum: str | None = None, **options) -> nn.Module:
    """`spectrum` (one, pow2, pow10) replaces the low-rank layers' initial factors, see set_spectrum."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    if spectrum is not None and spectrum not in SPECTRA:
        raise ModelError(f"unknown spectrum {spectrum!r}: choose one of {', '.join(SPECTRA)}")
    model = MODELS[name](tuple(input_shape), num_classes, low_rank=low_rank, rank=rank, **options)
    if spectrum is not None and not next(model.parameters()).is_meta:  # meta: a shape check only
        set_spectrum(model, spectrum)
    return model
