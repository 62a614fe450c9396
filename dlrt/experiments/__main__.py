"""`python -m dlrt.experiments ...` is `dlrt-run ...` (as torchrun's `-m dlrt.experiments` is, on each process)."""

from .cli import run

run()
