"""`python -m dlrt.cli` is the old name of `python -m dlrt.experiments` (dlrt-run), kept because the run records
made so far print it as the command that reproduces them. It is part of the harness, not of the method: the
layering contract (pyproject.toml) lets only the harness import it, and it alone of dlrt's top-level modules
imports the harness."""

from dlrt.experiments.cli import run

if __name__ == "__main__":
    run()
