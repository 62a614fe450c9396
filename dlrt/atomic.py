"""One way to write a file so that a crash never leaves half of it, for the method (dlrt.export) and the harness
(whose run folders wrap it with their own error message): write to a temporary name beside the file, then
rename it over the file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary name beside `path`, then rename it over `path`; the file gets the mode a new file
    of this process would get (not 0600, as safetensors and some other writers leave temporary files). An OSError
    leaves `path` as it was and propagates; the temporary file never stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
