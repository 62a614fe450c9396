"""A run folder, the unit of record: its files, written atomically, and owned by one process at a time.

    config.yaml      the resolved config, the keys the run reads (schema.recorded)
    epochs.csv       one row per epoch: losses, accuracies, ranks, parameter counts, compression, times
    summary.json     the selected epoch and the run's facts; "status": "completed" or "failed"
    checkpoint.pt    the latest epoch's model, optimizer and RNG states: an interrupted run resumes from it
    best_model.pt    the model at the selected epoch
    .lock            held while a process trains in the folder

Every file is written to a temporary name and renamed (`atomic_write`), so a crash never leaves half a file. The
trainer, dlrt-export and dlrt-tables all read and write run folders through this module.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from dlrt import atomic

FILES = ("config.yaml", "epochs.csv", "summary.json", "checkpoint.pt", "best_model.pt")
LOCK = ".lock"


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked; the message names the file and says what to do."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """dlrt.atomic.atomic_write, and a write that fails (a full disk, a folder that cannot be written) raises
    RunFolderError saying so; `path` stays as it was."""
    try:
        atomic.atomic_write(path, write)
    except OSError as e:
        kept = "the previous one is kept" if Path(path).exists() else "nothing was written"
        raise RunFolderError(f"cannot write {path} ({e.strerror or e}): {kept}; make room or choose another "
                             "folder, then run the same command again") from None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV, with the union of their keys as columns in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- what a folder holds ---------------------------------------------------------------

    def summary(self) -> dict | None:
        """summary.json, or None before the run has finished; an unreadable one is an error naming it."""
        path = self.file("summary.json")
        if not path.exists():
            return None
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary, dict) or "status" not in summary:
                raise ValueError("it has no status")
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{path} cannot be read ({' '.join(str(e).split())[:120]}): delete it to run "
                                 f"this run again, or the folder to start afresh") from None
        return summary

    def epochs(self):
        """epochs.csv as a pandas DataFrame with the columns a table reads; an unreadable one is an error."""
        import pandas as pd

        path = self.file("epochs.csv")
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{path} cannot be read ({' '.join(str(e).split())[:120]})") from None
        missing = {"epoch", "test_acc", "val_loss", "ranks"} - set(frame.columns)
        if missing:
            raise RunFolderError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: it is not a dlrt epochs.csv")
        return frame

    def config(self) -> dict:
        """config.yaml as a plain dict (resolved when it was written); an unreadable one is an error."""
        from omegaconf import OmegaConf

        path = self.file("config.yaml")
        try:
            config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            if not isinstance(config, dict):
                raise ValueError("it is not a mapping")
        except Exception as e:  # OmegaConf's and YAML's own errors
            raise RunFolderError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        return config

    # --- writing ---------------------------------------------------------------------------

    def write_config(self, cfg) -> None:
        from omegaconf import OmegaConf

        write_text(self.file("config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))

    def write_epochs(self, rows: list[dict]) -> None:
        write_csv(self.file("epochs.csv"), rows)

    def write_summary(self, summary: dict) -> None:
        write_json(self.file("summary.json"), summary)

    def save(self, name: str, obj) -> None:
        import torch

        buffer = io.BytesIO()  # serialised first: torch's own writer reports a full disk as an unrelated RuntimeError
        torch.save(obj, buffer)
        atomic_write(self.file(name), lambda tmp: tmp.write_bytes(buffer.getbuffer()))

    def load(self, name: str, map_location=None, weights_only: bool = False):
        """A torch file of the folder; one that cannot be read is an error naming it and what to do."""
        import torch

        path = self.file(name)
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # pickle, zip and torch errors alike
            raise RunFolderError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:150]}); "
                                 f"delete it to start this run afresh") from None

    # --- ownership -------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self):
        """Make the folder if need be and hold its lock while the block runs. A second process that claims the same
        folder gets RunFolderBusy at once. A folder this claim made is removed again if the block leaves nothing in
        it (a run that failed before writing its config), so a refused run leaves no trace."""
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"cannot make the run folder {self.path} ({e.strerror}): choose another out_dir") from None
        lock = FileLock(self.file(LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderBusy(f"run folder {self.path} is in use by another dlrt-run (its {LOCK} is held): wait "
                                f"for that run to end, or give this one other settings") from None
        try:
            yield self
        finally:
            lock.release()
            if made and not any(self.file(name).exists() for name in FILES):
                shutil.rmtree(self.path, ignore_errors=True)
