"""dlrt-export: a run's selected model as safetensors, and the loader that rebuilds it.

    dlrt-export runs/lenet5-mnist-adaptive-tau0.15-seed0 --format factored   # U, diag S, V: the honest storage
    dlrt-export runs/lenet5-mnist-adaptive-tau0.15-seed0 --format dense      # merged plain torch modules

    model = dlrt.export.load_exported("model-factored.safetensors")

The file's metadata holds what rebuilds the network (model name and options, input shape, classes,
ranks), so the loader needs nothing but the file. In the factored format a low-rank layer stores U,
V and only the diagonal of S (S is diagonal after every truncation; a non-diagonal S, as after
s_only fine-tuning, is stored whole).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from .convert import merge
from .layers import low_rank_layers
from .models import build_model
from .train import input_spec, make_model

FORMATS = ("factored", "dense")


def _architecture(cfg, input_shape, num_classes, ranks) -> dict:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    options = {k: v for k, v in model_cfg.items() if k not in ("name", "rank", "protocol", "spectrum")}
    return {"model": model_cfg["name"], "options": options, "input_shape": list(input_shape),
            "num_classes": num_classes, "ranks": ranks}


def export_run(run_dir: Path, fmt: str, out: Path | None = None) -> Path:
    """Write the run's selected model (best_model.pt) in `fmt`; returns the file written."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for name in ("config.yaml", "best_model.pt", "summary.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {name} is missing")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    state = torch.load(run_dir / "best_model.pt", map_location="cpu", weights_only=True)
    input_shape, num_classes = input_spec(cfg.data)
    model = make_model(cfg, input_shape, num_classes)
    model.load_state_dict(state)
    ranks = [layer.rank for layer in low_rank_layers(model)]
    architecture = _architecture(cfg, input_shape, num_classes, ranks)
    if fmt == "dense":
        tensors = merge(model).state_dict()
    else:
        tensors = _factored_tensors(model)
    metadata = {"format": fmt, "architecture": json.dumps(architecture), "low_rank": str(bool(ranks) and fmt == "factored")}
    out = Path(out) if out else run_dir / f"model-{fmt}.safetensors"
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def _factored_tensors(model) -> dict[str, torch.Tensor]:
    tensors = dict(model.state_dict())
    for name, module in model.named_modules():
        if module in low_rank_layers(model):
            S = tensors[f"{name}.S"]
            if torch.equal(S, torch.diag(torch.diagonal(S))):
                tensors[f"{name}.S"] = torch.diagonal(S).clone()  # diagonal after truncation: r numbers, not r^2
    return tensors


def load_exported(path: str | Path) -> torch.nn.Module:
    """Rebuild the network of an exported file and load its weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    architecture = json.loads(metadata["architecture"])
    tensors = load_file(str(path))
    low_rank = metadata["low_rank"] == "True"
    with torch.device("meta"):  # shapes only; the file's tensors replace every parameter
        model = build_model(architecture["model"], architecture["input_shape"], architecture["num_classes"],
                            low_rank=low_rank, rank=architecture["ranks"] or None, **architecture["options"])
    for layer_name, module in model.named_modules():
        if module in low_rank_layers(model):
            S = tensors[f"{layer_name}.S"]
            if S.dim() == 1:
                tensors[f"{layer_name}.S"] = torch.diag(S)
    model.load_state_dict(tensors, assign=True)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dlrt-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (with best_model.pt)")
    parser.add_argument("--format", choices=FORMATS, default="factored")
    parser.add_argument("--out", type=Path, default=None, help="output file (default RUN_DIR/model-FORMAT.safetensors)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.format, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"dlrt-export: error: {e}", file=sys.stderr)
        return 2
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
