"""dlrt-export: a finished run's selected model as a safetensors file that rebuilds itself (dlrt.export).

    dlrt-export runs/lenet5-mnist-adaptive-tau0.15-seed0 --format factored   # U, diag S, V: the honest storage
    dlrt-export runs/lenet5-mnist-adaptive-tau0.15-seed0 --format dense      # merged plain torch modules

    model = dlrt.export.load_exported("runs/.../model-factored.safetensors")
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dlrt.export import FORMATS, save_model

from .run_folder import RunFolder, RunFolderError

BUILDER = "dlrt.experiments.models:build_model"  # with low_rank=False: the dense network; the file's ConvertConfig
                                                 # makes its low-rank layers


class ExportError(RuntimeError):
    """A run folder that cannot be exported as asked; the message says why and what to do."""


def export_run(run_dir: str | Path, fmt: str = "factored", out: str | Path | None = None, force: bool = False) -> Path:
    """Write the run's selected model (best_model.pt) in `fmt`; returns the file written. A failed run is refused
    unless `force` (its best_model.pt is the best epoch before it failed)."""
    import torch

    from .data import input_spec
    from .runtime import make_model

    folder = RunFolder(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for name in ("config.yaml", "best_model.pt"):
        if not folder.file(name).exists():
            raise ExportError(f"{folder} is not a run folder with a trained model: {name} is missing")
    summary = folder.summary()
    if (summary is None or summary["status"] != "completed") and not force:
        state = "has not finished" if summary is None else f"failed ({summary.get('reason')})"
        raise ExportError(f"{folder} {state}: its best_model.pt is the best epoch so far; pass --force to export it")
    summary = summary or {}  # an unfinished run's shapes come from its config
    cfg = OmegaConf.create(folder.config())
    input_shape, num_classes = input_spec(cfg.data)
    if summary.get("num_classes"):  # an image folder's class count, as the run found it
        input_shape, num_classes = tuple(summary["input_shape"]), summary["num_classes"]
    model = make_model(cfg, input_shape, num_classes)
    try:
        model.load_state_dict(folder.load("best_model.pt", map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ExportError(f"{folder.file('best_model.pt')} does not fit the model of its config.yaml "
                          f"({' '.join(str(e).split())[:150]})") from None
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
               if k not in ("name", "rank", "spectrum", "init")}
    out = Path(out) if out else folder.file(f"model-{fmt}.safetensors")
    _check_out(out)
    from safetensors import SafetensorError

    try:
        with torch.no_grad():
            return save_model(model, out, fmt, builder=BUILDER, name=cfg.model.name, input_shape=list(input_shape),
                              num_classes=num_classes, low_rank=False, **options)
    except SafetensorError as e:  # safetensors' own word for a file it cannot write
        raise ExportError(f"cannot write {out} ({' '.join(str(e).split())[:150]}): choose another --out") from None


def _check_out(out: Path) -> None:
    """The file is replaced by a rename: a folder, a device (/dev/null) or a folder that cannot be written is refused
    before anything is written (as root, a rename over /dev/null would replace the device with a file)."""
    if out.exists() and not out.is_file():
        raise ExportError(f"--out {out} exists and is not a file: give the name of a file to write")
    existing = next(p for p in [out.parent.absolute(), *out.parent.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {existing} cannot be written by this user: choose another --out")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dlrt-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run folder (with best_model.pt)")
    parser.add_argument("--format", choices=FORMATS, default="factored")
    parser.add_argument("--out", default=None, help="output file (default RUN_DIR/model-FORMAT.safetensors)")
    parser.add_argument("--force", action="store_true", help="export a failed or unfinished run too")
    args = parser.parse_args(argv)
    if not args.run_dir.strip() or (args.out is not None and not args.out.strip()):
        parser.error("an empty path: give a run folder, and for --out a file name")
    try:
        out = export_run(args.run_dir, args.format, args.out, args.force)
    except (ExportError, RunFolderError, OSError) as e:
        print(f"dlrt-export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
