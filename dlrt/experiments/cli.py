"""dlrt-run: the Hydra app that trains one run per job, each into its own run folder.

    dlrt-run model=lenet5 tau=0.15
    dlrt-run -m tau=0.1,0.15,0.2 'seed=range(3)'

Everything Hydra offers works as Hydra documents it (completion, sweeps with range() and choice(), launchers,
-cd/-cp with one's own config groups, --cfg, --help). What differs: every error a user can cause is said in one
line, with exit code 2, before any folder is made; a failed run exits 1, an interrupted one 130; and a sweep
checks every job's config before it starts any, goes on when a job fails, and ends listing the failed ones.

This module imports neither torch nor the trainer until a job runs, so that --help and completion are fast.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from . import schema

CONFIG_DIR = schema.CONFIG_DIR  # configs/ in a checkout, dlrt/experiments/conf in a wheel
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130

HELP = """dlrt-run: Dynamical Low-Rank Training (Schotthöfer et al., NeurIPS 2022) of the paper's networks. Each run
trains into its own folder under out_dir (config.yaml, epochs.csv, summary.json, checkpoints); a finished run is
skipped and an interrupted one resumes when the same command is run again. docs/runner.md explains every key.

  dlrt-run model=lenet5 tau=0.15                  the paper's LeNet5 recipe at ϑ = 0.15
  dlrt-run -m experiment=lenet5_mnist             a published protocol with its sweep
  dlrt-run -m tau=0.1,0.2 'seed=range(3)'         a sweep of your own; hydra/launcher=joblib runs jobs in parallel

== Groups (group=option) ==
$APP_CONFIG_GROUPS
== Keys (key=value) and their values for this command ==
$CONFIG
Use --hydra-help for Hydra's own flags (completion: -sc install=bash).
"""


class SweepFailed(RuntimeError):
    def __init__(self, failures: list[str]):
        super().__init__(f"{len(failures)} job(s) of the sweep failed:\n" + "\n".join(f"  {f}" for f in failures))


def _task(cfg: DictConfig):
    """One job. A single run that fails exits here, with its one line; a sweep's failing job raises, so that the
    sweeper records it and goes on (cli.SweepFailed lists them at the end)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .runner import run_job  # torch and the trainer: only when a job runs

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_job(cfg)
    try:
        return run_job(cfg)
    except Exception as e:
        _fail_known(e)


_hydra_main = hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(_task)


def register() -> None:
    """The run schema, the recipe resolvers, the checking sweeper and the help text (idempotent)."""
    schema.register()
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="dlrt", node={"max_batch_size": None, "params": None,  # as Hydra's basic
                                                          "_target_": "hydra_plugins.dlrt_sweeper.checking_sweeper.CheckingSweeper"})
    store.store(group="hydra/help", name="dlrt", node={"app_name": "dlrt-run", "header": "", "footer": "",
                                                        "template": HELP})


def compose_config(overrides: list[str]) -> DictConfig:
    """The config these overrides compose to, as dlrt-run builds it (unresolved)."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def app_help(overrides: list[str]) -> str:
    """HELP with the groups and the resolved config of these overrides (Hydra's own --help shows the recipe values
    as unresolved interpolations)."""
    from omegaconf import OmegaConf

    groups = "\n".join(f"{folder.name}: {', '.join(sorted(p.stem for p in folder.glob('*.yaml')))}"
                       for folder in sorted(CONFIG_DIR.iterdir()) if folder.is_dir())
    try:
        config = OmegaConf.to_yaml(compose_config(overrides), resolve=True)
    except Exception as e:  # a bad override: say so where the config would be
        config = f"(not composed: {_composition_message(e)})\n"
    return HELP.replace("$APP_CONFIG_GROUPS", groups + "\n").replace("$CONFIG", config)


def _fail(message: str, code: int) -> None:
    print(f"dlrt-run: error: {message}", file=sys.stderr)
    sys.exit(code)


def run() -> None:
    """dlrt-run: Hydra's app, with its errors and ours said in one line and mapped to exit codes."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .validate import ConfigError

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing a stack trace
    register()
    wants_help = {"--help", "-h"} & set(sys.argv[1:]) and not any(a.startswith("-c") or a.startswith("--config")
                                                                  for a in sys.argv[1:])
    try:
        if wants_help:
            print(app_help([a for a in sys.argv[1:] if not a.startswith("-")]))
        else:
            _hydra_main()
        sys.stdout.flush()  # here, not at exit, is where a reader that left is found
    except BrokenPipeError:  # `dlrt-run --help | head`: as Python's docs on SIGPIPE do it, the rest goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except SweepFailed as e:
        _fail(str(e), EXIT_FAILED)
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        _fail(_composition_message(e) if not isinstance(e, ConfigError) else str(e), EXIT_USAGE)
    except Exception as e:
        _fail_known(e)
    except BaseException as e:
        train = sys.modules.get(f"{__package__}.train")  # loaded if a run raised e; not imported (torch) for --help
        if train is not None and isinstance(e, train.Interrupted):
            _fail(str(e), EXIT_INTERRUPTED)
        raise


def _fail_known(e: Exception) -> None:
    from .runner import RunFailed, UserError
    from .validate import ConfigError

    if isinstance(e, (UserError, ConfigError)):
        _fail(str(e), EXIT_USAGE)
    if isinstance(e, RunFailed):
        _fail(str(e), EXIT_FAILED)
    raise e


def _composition_message(e: Exception) -> str:
    """Hydra wraps OmegaConf's message ("Value 'abc' ... Integer", full_key: seed) in its own ("Error merging
    override seed=abc"): both, on one line; an unknown option or key in our words."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from .validate import one_line

    if isinstance(e, MissingConfigException) and e.options:
        group, _, option = (e.missing_cfg_file or "").partition("/")
        options = ", ".join(o for o in e.options if not o.endswith("_schema"))
        return f"unknown {group} {option!r}: choose one of {options}"
    # An unknown key is a plain ConfigCompositionException, like any composition error: Hydra has no class of
    # its own for it, so its message is the only mark.
    if isinstance(e, ConfigCompositionException) and str(e).startswith("Could not override"):
        key = str(e).split("'")[1]
        return f"unknown key {key!r}: dlrt-run has no such setting (dlrt-run --help and docs/runner.md list the keys)"
    causes = [e]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    text = "; ".join(dict.fromkeys(one_line(c) for c in causes if str(c).strip()))
    return text.replace("Did you mean to override", "did you mean").rstrip(".")


if __name__ == "__main__":
    run()
