"""Rows of earlier tables whose run folders were not kept: shown where no run folder of the same row exists,
marked as archived, never mixed with new runs.

An archive folder (dlrt-tables --archive DIR) holds table CSVs as dlrt-tables wrote them (<table>.csv, same
columns) and a README.md that says where they came from; the header of each table names it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

# The FC tables before they read the final epoch: their runs were selected at minimum validation loss.
FC_BEFORE_FINAL_SELECTION = {
    "selection": lambda row: "min_val_loss",
    "min_val_loss_test_acc_mean": lambda row: row.get("test_acc_mean"),
    "min_val_loss_test_acc_std": lambda row: row.get("test_acc_std"),
    "min_val_loss_ranks": lambda row: row.get("ranks"),
    "min_val_loss_epochs": lambda row: row.get("selected_epochs"),
    "adaptive_end_ranks": lambda row: row.get("final_ranks"),  # the fine-tuning keeps the adaptive phase's ranks
}
# A table's row key, and how archived rows fill the columns their table did not have yet.
KEYS = {
    "lenet5_mnist": (("method", "tau", "init", "settings"), {"init": lambda row: "" if row["method"] == "dense" else "svd"}),
    "fc500_mnist": (("width", "method", "tau", "settings"), FC_BEFORE_FINAL_SELECTION),
    "fc784_mnist": (("width", "method", "tau", "settings"), FC_BEFORE_FINAL_SELECTION),
    "dlrt_vs_uv": (("spectrum", "method", "settings"), {}),
}


def _key(row: dict, columns) -> tuple:
    def norm(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return round(value, 6) if isinstance(value, float) else str(value)
    return tuple(norm(row.get(column)) for column in columns)


def fill_from_archive(name: str, frame: pd.DataFrame, archive: Path | None) -> tuple[pd.DataFrame, str | None]:
    """The frame with archived rows in place of rows that have no run (or added where the frame has no such row);
    and a line for the table's header, or None when nothing was taken."""
    path = None if archive is None else Path(archive) / f"{name}.csv"
    if path is None or not path.exists() or name not in KEYS:
        return frame, None
    columns, filled = KEYS[name]
    old = pd.read_csv(path, keep_default_na=False, na_values=[""]).to_dict("records")
    rows = frame.to_dict("records")
    index = {_key(row, columns): i for i, row in enumerate(rows)}
    taken = 0
    for row in old:
        row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        row = {**{key: fill(row) for key, fill in filled.items()}, **row}
        if not row.get("n_seeds"):
            continue
        row["source"] = str(path)
        at = index.get(_key(row, columns))
        if at is None:
            rows.append(row)
        elif not rows[at].get("n_seeds"):
            rows[at] = {**rows[at], **row}
        else:
            continue
        taken += 1
    if not taken:
        return frame, None
    readme = Path(archive) / "README.md"
    origin = readme.read_text().strip().splitlines()[0].lstrip("# ") if readme.exists() else str(archive)
    return pd.DataFrame(rows), f"{taken} row(s) from `{path}` ({origin})"
