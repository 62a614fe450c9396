"""The paper's networks, dense or with their low-rank layers (PAPER.md §2): fc, lenet5, vgg16, resnet50.

    build_model("lenet5", input_shape=(1, 28, 28), num_classes=10, low_rank=True, rank=None, init="svd")

Every net is built dense and then converted by `dlrt.convert`, the same rules a user's model goes through.
`rank` sets the initial rank of every low-rank layer: None starts each at its largest adaptive rank
⌊min(n, m)/2⌋ (training then cuts it down to what ϑ asks), an int caps every layer at that rank, a float in
(0, 1] is a fraction of each layer's full rank, a list gives one rank per low-rank layer. `init` is
"svd" (the truncated SVD of torch's default draw) or "authors" (the published code's random factors). The
output layer always stays dense, as in the paper.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from dlrt.conversion import convert
from dlrt.layers import INITS, low_rank_layers, random_orthonormal, sorted_half_normal

from .protocols import SPECTRA  # the paper's initial spectra, σ_k = d^-k


class ModelError(ValueError):
    """A model cannot be built as asked; the message says why and what to do."""


def fc(input_shape, num_classes, width: int = 500, depth: int = 4) -> nn.Module:
    """784 -> width x depth -> 10 with ReLU."""
    dims = [math.prod(input_shape)] + [width] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape, num_classes) -> nn.Module:
    """conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc out."""
    channels, height, width = input_shape
    side = lambda size: ((size - 4) // 2 - 4) // 2  # two 5x5 convs, each followed by a 2x2 pool
    if min(side(height), side(width)) < 1:
        raise ModelError(f"lenet5 needs inputs of at least 16x16 pixels, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side(height) * side(width), 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


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


def vgg16(input_shape, num_classes) -> nn.Module:
    """torchvision's VGG16; for 32x32 inputs its classifier is 512 -> 512 -> 512 -> classes after a 1x1 pool."""
    import torchvision  # slow to import: only for the nets that need it

    net = torchvision.models.vgg16(num_classes=num_classes)
    _first_conv_channels(net, "features.0", input_shape[0])
    if is_small_image(input_shape):
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
            nn.Linear(512, num_classes),
        )
    return net


def resnet50(input_shape, num_classes) -> nn.Module:
    """torchvision's ResNet-50; for 32x32 inputs a 3x3 stride-1 first conv and no max-pool."""
    import torchvision

    net = torchvision.models.resnet50(num_classes=num_classes)
    if is_small_image(input_shape):
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    _first_conv_channels(net, "conv1", input_shape[0])
    return net


MODELS: dict[str, Callable[..., nn.Module]] = {"fc": fc, "lenet5": lenet5, "vgg16": vgg16, "resnet50": resnet50}
# The paper makes LeNet5's first conv low-rank; torchvision's nets keep theirs dense (a C_out x 27 matrix).
LOW_RANK_FIRST_CONV = {"lenet5"}


def spectrum_values(spectrum: str, rank: int, init: str, like: torch.Tensor) -> torch.Tensor:
    """The singular values of a `spectrum` start: d^-k ("svd": the values alone), or s_k d^-k with s the
    sorted draws of |N(0, 1)| ("authors": UV_vanilla/my_conv_dlrt.py and Linear_layer_new_dlrt.py of the
    published code, whose fixed-rank layers draw r values, not 2r)."""
    decay = SPECTRA[spectrum] ** -torch.arange(rank, dtype=like.dtype, device=like.device)
    return decay * sorted_half_normal(rank, rank, like) if init == "authors" else decay


@torch.no_grad()
def set_spectrum(model: nn.Module, spectrum: str, init: str = "svd", layers=None) -> None:
    """Give every low-rank layer (or those of `layers`) random orthonormal U, V and S = diag(spectrum_values)."""
    for layer in low_rank_layers(model) if layers is None else layers:
        U, S, V = layer.U, layer.S, layer.V
        layer.set_factors(random_orthonormal(*U.shape, U), torch.diag(spectrum_values(spectrum, layer.rank, init, S)),
                          random_orthonormal(*V.shape, V))


def build_model(name: str, input_shape, num_classes: int, low_rank: bool = True, rank=None,
                spectrum: str | None = None, init: str = "svd", **options) -> nn.Module:
    """`spectrum` (one, pow2, pow10) replaces the low-rank layers' initial factors, see set_spectrum."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    if spectrum is not None and spectrum not in SPECTRA:
        raise ModelError(f"unknown spectrum {spectrum!r}: choose one of {', '.join(SPECTRA)}")
    if init not in INITS:
        raise ModelError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    model = MODELS[name](tuple(input_shape), num_classes, **options)
    if not low_rank:
        return model
    try:
        convert(model, rank=rank, keep_first_conv=name not in LOW_RANK_FIRST_CONV, from_weights=init == "svd", init=init)
    except ValueError as e:
        raise ModelError(f"model.rank: {e}") from None
    if spectrum is not None and not next(model.parameters()).is_meta:  # meta: a shape check only
        set_spectrum(model, spectrum, init)
    return model
