from dlrt.experiments.sweeper import CheckingSweeper as _CheckingSweeper


class CheckingSweeper(_CheckingSweeper):
    """dlrt.experiments.sweeper.CheckingSweeper, under the name Hydra's plugin discovery accepts."""
