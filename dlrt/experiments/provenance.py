"""Which code made a result: the git commit of the source tree, recorded in run summaries and bench CSVs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def code_version() -> str:
    """The git commit of the source tree, with '+dirty' when the package's own files have uncommitted changes
    (results written into the same checkout do not count), or 'unknown' outside a git checkout."""
    package = Path(__file__).resolve().parents[1]  # the whole dlrt package, method and harness
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=package,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# Read when this module is imported, i.e. of the code this process runs, however long it runs.
CODE_VERSION = code_version()
