"""A trained model as a safetensors file that rebuilds itself: `save_model` and `load_exported`.

    dlrt.export.save_model(model, "net.safetensors", "factored", builder="mypkg.nets:make_net", width=500)
    model = dlrt.export.load_exported("net.safetensors")

Formats: "factored" keeps each low-rank layer's U, V and only the diagonal of S (S is diagonal after every
truncation; a non-diagonal S, as after s_only fine-tuning, is stored whole): the honest storage of a compressed
model. "dense" stores the merged plain nn.Linear / nn.Conv2d weights (dlrt.merge).

The file's metadata names the function that builds the network ("module:function") and its keyword arguments,
plus the layers' ranks, so the loader needs nothing but the file. The builder is called as
builder(**kwargs, low_rank=<format is factored>, rank=<the ranks>) on the meta device; the file's tensors then
replace every parameter. dlrt-run's models are built by dlrt.experiments.models:build_model.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .conversion import merge
from .layers import low_rank_layers

FORMATS = ("factored", "dense")


def save_model(model: nn.Module, path: str | Path, fmt: str = "factored", builder: str | None = None,
               **builder_kwargs) -> Path:
    """Write `model` to `path` in `fmt`, making missing folders; returns the path. `builder`: see the module."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    from safetensors.torch import save_file

    ranks = [layer.rank for layer in low_rank_layers(model)]
    tensors = merge(copy.deepcopy(model)).state_dict() if fmt == "dense" else _factored_tensors(model)
    metadata = {"format": fmt, "builder": builder or "", "builder_kwargs": json.dumps(builder_kwargs),
                "ranks": json.dumps(ranks), "low_rank": str(bool(ranks) and fmt == "factored")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any new file: safetensors leaves 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    builder, kwargs = _builder(metadata)
    low_rank = metadata.get("low_rank") == "True"
    with torch.device("meta"):  # shapes only; the file's tensors replace every parameter
        model = builder(**kwargs, low_rank=low_rank, rank=json.loads(metadata.get("ranks", "[]")) or None)
    layers = {id(layer) for layer in low_rank_layers(model)}
    for name, module in model.named_modules():
        if id(module) in layers and tensors[f"{name}.S"].dim() == 1:
            tensors[f"{name}.S"] = torch.diag(tensors[f"{name}.S"])
    model.load_state_dict(tensors, assign=True)
    return model.eval()


def _builder(metadata: dict):
    if "architecture" in metadata:  # files of dlrt 0.1 name a model of dlrt-run
        architecture = json.loads(metadata["architecture"])
        metadata = {"builder": "dlrt.experiments.models:build_model", "ranks": json.dumps(architecture["ranks"]),
                    "builder_kwargs": json.dumps({"name": architecture["model"], "input_shape": architecture["input_shape"],
                                                  "num_classes": architecture["num_classes"], **architecture["options"]})}
    if not metadata.get("builder"):
        raise ValueError("the file names no builder, so it cannot rebuild the network: save it with "
                         "save_model(..., builder='module:function'), or load its tensors with safetensors")
    module, _, function = metadata["builder"].partition(":")
    return getattr(importlib.import_module(module), function), json.loads(metadata.get("builder_kwargs", "{}"))
