"""Hydra finds sweepers only in the hydra_plugins namespace: dlrt-run's checking sweeper (dlrt.experiments.sweeper)
is made known to it here."""
