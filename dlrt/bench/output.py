"""What the bench writes: the columns every row carries (Meta), <suite>.csv, and the printed tables that also go to
<suite>.txt; all written atomically (dlrt.experiments.run_folder)."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from dlrt.experiments.devices import device_name
from dlrt.experiments.provenance import CODE_VERSION
from dlrt.experiments.run_folder import write_csv, write_text

CONTENDED_PCT = 10.0  # other processes' share of the CPUs above which a CPU timing is flagged


class Meta:
    """Columns every CSV row carries."""

    def __init__(self, device: torch.device, command: str, flush_denormal: bool):
        self.fields = {
            "device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": flush_denormal,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "code_version": CODE_VERSION,
        }


def ranks_str(ranks) -> str:
    return "[" + ",".join(str(r) for r in ranks) + "]" if ranks else ""


def fmt(value):
    """Floats to 4 significant digits (whole numbers from 10^4 up), NaN as "nan"."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return value


def write_rows(path: Path, rows: list[dict]) -> None:
    """A suite's rows as CSV, the union of their keys as columns in first-seen order."""
    write_csv(Path(path), [{key: fmt(value) for key, value in row.items()} for row in rows])


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(fmt(r.get(c, ""))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


class Report:
    """What the bench prints. Each suite's part, after the lines said before any suite began, is also its .txt."""

    def __init__(self):
        self.header: list[str] = []
        self.lines = self.header

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def section(self) -> None:
        self.lines = list(self.header)

    def save(self, path: Path) -> None:
        write_text(Path(path), "\n".join(self.lines) + "\n")


def contention_warning(rows: list[dict], device: torch.device, say) -> None:
    shares = [v for v in (r.get("others_cpu_pct", float("nan")) for r in rows) if v == v]
    worst = max(shares, default=0.0)
    if device.type != "cpu" or worst <= CONTENDED_PCT:
        return
    if torch.get_num_threads() > 1:
        advice = (f"With {torch.get_num_threads()} threads a stolen core stalls every multi-threaded kernel: "
                  "wall times, CPU times and even ratios are unreliable. Rerun on a quiet machine "
                  "(--wait-idle 600) or with --threads 1 and read the cpu_ms columns.")
    else:
        advice = ("With 1 thread the wall times include the turns other processes took; the cpu_ms columns "
                  "(this process's CPU time) are the robust measure of the work.")
    say(f"WARNING: other processes used up to {worst:.0f}% of the CPUs while this was timed "
        f"(column others_cpu_pct). {advice}")


def report_errors(rows: list[dict], say) -> None:
    """One line per failed (case or rank, method, error)."""
    seen = set()
    for r in rows:
        if not r.get("error"):
            continue
        key = (r.get("case", r.get("rank")), r.get("method"), r["error"])
        if key not in seen:
            seen.add(key)
            where = r.get("case") or f"rank {r.get('rank')}"
            say(f"FAILED: {where} {r.get('method')}: {r['error']}")
