"""`python -m dlrt.cli` runs dlrt-run (dlrt.experiments.cli): the entry point of the harness, kept at its old
name. The only module of the method package that imports the harness."""

from dlrt.experiments.cli import run

if __name__ == "__main__":
    run()
