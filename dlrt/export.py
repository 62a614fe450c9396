"""A trained model as a safetensors file that rebuilds itself: `save_model` and `load_exported`.

    model, _ = dlrt.convert(torchvision.models.resnet18(num_classes=10), rank=0.25)
    ...                                                                  # train
    dlrt.export.save_model(model, "net.safetensors", builder="torchvision.models:resnet18", num_classes=10)
    model = dlrt.export.load_exported("net.safetensors")

Formats: "factored" keeps each low-rank layer's U, V and only the diagonal of S (S is diagonal after every
truncation; a non-diagonal S, as after s_only fine-tuning, is stored whole): the honest storage of a compressed
model. "dense" stores the merged plain nn.Linear / nn.Conv2d weights (dlrt.merge).

The file's metadata names what builds the network ("module:function" and its keyword arguments; without a
builder, the model's own class, when it can be imported and made from those arguments) and, as peft's adapter
config does, the conversion: a dlrt.ConvertConfig with the low-rank layers' names and ranks. The loader calls the
builder on the meta device, merges what it built (so any layers, low-rank or not, will do), converts it by the
stored config, and puts the file's tensors in place of every parameter: the rest is dlrt's alone.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .conversion import ConvertConfig, convert, merge
from .layers import low_rank_layers

FORMATS = ("factored", "dense")


def save_model(model: nn.Module, path: str | Path, fmt: str = "factored", builder: str | None = None,
               **builder_kwargs) -> Path:
    """Write `model` to `path` in `fmt`, making missing folders; returns the path. `builder` ("module:function",
    called with builder_kwargs) makes the network, dense or not; None: the model's own class. Refused, before
    anything is written, when the loader could not rebuild the model from them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    from safetensors.torch import save_file

    tensors = merge(copy.deepcopy(model)).state_dict() if fmt == "dense" else _factored_tensors(model)
    metadata = {"format": fmt, "builder": builder or f"{type(model).__module__}:{type(model).__qualname__}",
                "builder_kwargs": _json(builder_kwargs),
                "conversion": json.dumps(ConvertConfig.of(model).to_dict() if fmt == "factored" else {})}
    _check_rebuilds(metadata, tensors if fmt == "dense" else model.state_dict(), given=builder is not None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    on_host = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(on_host, str(tmp), metadata=metadata))
    return path


def _json(kwargs: dict) -> str:
    try:
        return json.dumps(kwargs)
    except TypeError as error:
        raise ValueError(f"the builder's keyword arguments must be JSON values (numbers, strings, lists, dicts): "
                         f"{error}") from None


def _check_rebuilds(metadata: dict, expected: dict[str, torch.Tensor], given: bool) -> None:
    """Rebuild the model on the meta device as load_exported will, and refuse in one line when it does not come out
    with the saved tensors' names and shapes."""
    what = (f"builder {metadata['builder']!r} with {metadata['builder_kwargs']}" if given
            else f"its class {metadata['builder']} without a builder")
    advice = ("pass builder='module:function' and the keyword arguments that make this network, dense or low-rank "
              "(e.g. save_model(model, path, builder='torchvision.models:resnet18', num_classes=10))")
    try:
        with torch.device("meta"):
            shapes = {key: tuple(t.shape) for key, t in _rebuild(metadata).state_dict().items()}
    except Exception as error:  # whatever a user's builder raises, the file would not load
        raise ValueError(f"save_model: the loader could not rebuild this model from {what} "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): {advice}") from None
    wanted = {key: tuple(t.shape) for key, t in expected.items()}
    if shapes != wanted:
        differ = sorted(set(shapes) ^ set(wanted)) or sorted(k for k in wanted if shapes[k] != wanted[k])
        raise ValueError(f"save_model: {what} makes a network that differs from this model (in {len(differ)} "
                         f"tensor(s), first {differ[0]!r}), so the file could not be loaded: {advice}")


def _import(builder: str):
    module, _, name = builder.partition(":")
    if module == "__main__" or "<locals>" in name:
        raise ValueError(f"{builder} is defined in a script or a function, which a loader cannot import: define it "
                         "at the top level of a module")
    value = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _factored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict())
    layers = {id(layer) for layer in low_rank_layers(model)}
    for name, module in model.named_modules():
        if id(module) in layers:
            S = tensors[f"{name}.S"]
            if torch.equal(S, torch.diag(torch.diagonal(S))):
                tensors[f"{name}.S"] = torch.diagonal(S).clone()  # diagonal after truncation: r numbers, not r^2
    return tensors


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the network of an exported file and load its weights; in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    with torch.device("meta"):  # shapes only; the file's tensors replace every parameter
        model = _rebuild(metadata)
    layers = {id(layer) for layer in low_rank_layers(model)}
    for name, module in model.named_modules():
        if id(module) in layers and tensors[f"{name}.S"].dim() == 1:
            tensors[f"{name}.S"] = torch.diag(tensors[f"{name}.S"])
    model.load_state_dict(tensors, assign=True)
    return model.eval()


def _rebuild(metadata: dict) -> nn.Module:
    """The network the metadata describes: the builder's, merged, converted by the stored ConvertConfig."""
    if "conversion" not in metadata:
        raise ValueError("this file was written by an older dlrt, whose builder made the low-rank layers itself, and "
                         "names no conversion: export the model again (dlrt-export RUN_DIR, or save_model)")
    model = merge(_import(metadata["builder"])(**json.loads(metadata["builder_kwargs"])))
    conversion = json.loads(metadata["conversion"])
    if conversion:  # a dense file's is {}: the merged network is the model
        model, _ = convert(model, from_weights=False, config=ConvertConfig.from_dict(conversion))
    return model
