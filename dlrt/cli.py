"""Console scripts: dlrt-run (Hydra), dlrt-tables, dlrt-bench.

    dlrt-run model=lenet5 tau=0.15
    dlrt-run -m tau=0.1,0.15,0.2 seed=0,1

Every override is checked before any work starts: an unknown model, data set, method or key, or a
value that cannot work, gives a one-line error and exit code 2.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .data import DataError
from .models import ModelError
from .train import CheckpointError, ConfigError, Interrupted, TrainingDiverged, train, validate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "data", "method", "optim", "experiment")
# Keys that name a run folder; the other overrides are appended so different settings never share one,
# except those that do not change what is computed.
NAMING_KEYS = ("model", "data", "method", "tau", "seed", "experiment")
NOT_IN_NAME = ("out_dir", "progress", "device", "eval_batch_size", "threads", "flush_denormal")  # precision is in the name


def _fail(message: str, code: int = 2):
    print(f"dlrt-run: error: {message}", file=sys.stderr)
    sys.exit(code)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _split_override(arg: str):
    key, _, value = arg.partition("=")
    return key.lstrip("+~"), value


def _sweep_values(value: str) -> list[str]:
    """a,b,c -> [a, b, c] (Hydra's simple sweep); anything bracketed or functional stays whole."""
    if "," in value and not re.search(r"[\[\](){}]", value):
        return value.split(",")
    return [value]


def check_overrides(args: list[str]) -> None:
    """Compose the config of every job that `args` asks for, and validate each, before Hydra starts."""
    overrides = [a for a in args if not a.startswith("-") and "=" in a and not a.startswith("hydra")]
    for arg in overrides:
        if arg.startswith("+") and not arg.startswith("++"):
            _fail(f"{arg}: dlrt has no setting {arg[1:].partition('=')[0]!r} (adding keys with + would be ignored); see README.md for the keys")
        key, value = _split_override(arg)
        if key in GROUPS:
            for choice in _sweep_values(value):
                if choice not in _options(key) and not (key == "experiment" and choice == "null"):
                    _fail(f"unknown {key} {choice!r}: choose one of {', '.join(_options(key))}")
    per_key = [[f"{arg.partition('=')[0]}={v}" for v in _sweep_values(arg.partition("=")[2])] for arg in overrides]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in itertools.product(*per_key):
            try:
                cfg = compose("config", overrides=list(job))
                validate(cfg)
            except ConfigError as e:
                _fail(str(e))
            except Exception as e:  # Hydra's and OmegaConf's own messages, on one line
                _fail(" ".join(str(e).split()))


def run_name(cfg: DictConfig, task_overrides: list[str]) -> str:
    name = f"{cfg.model.name}-{cfg.data.name}-{cfg.method.name}-tau{cfg.tau}-seed{cfg.seed}"
    extra = sorted(o.lstrip("+~") for o in task_overrides if _split_override(o)[0] not in NAMING_KEYS + NOT_IN_NAME)
    if extra:
        name += "_" + ",".join(extra)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    return f"{experiment}/{name}" if experiment not in (None, "null") else name


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as e:
        _fail(str(e))
    run_dir = Path(cfg.out_dir) / run_name(cfg, list(HydraConfig.get().overrides.task))
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "completed":
            print(f"skipping {run_dir}: already finished (delete the folder to run it again)", file=sys.stderr)
        else:
            print(f"skipping {run_dir}: it failed before ({summary.get('reason')}); delete the folder to retry",
                  file=sys.stderr)
        return
    print(f"run folder: {run_dir}", file=sys.stderr)
    try:
        summary = train(cfg, run_dir)
    except (DataError, ModelError, CheckpointError) as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except Interrupted as e:
        _fail(str(e), code=130)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    best = summary["selected"]
    print(f"done: {run_dir}\n  selected epoch {best['epoch']} ({summary['selection']}): test acc {best['test_acc']:.2f}%, "
          f"ranks [{best['ranks']}], c.r. eval {best['cr_eval_honest']:.1f}% honest / {best['cr_eval_paper']:.1f}% "
          f"paper convention, {summary['seconds_per_epoch']:.1f} s per epoch")


def run() -> None:
    """dlrt-run: check every override, then hand over to Hydra."""
    check_overrides(sys.argv[1:])
    _hydra_main()


def tables() -> None:
    from .tables import main

    main()


def bench() -> None:
    from .bench import main

    main()


if __name__ == "__main__":
    run()
