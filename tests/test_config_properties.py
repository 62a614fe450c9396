"""Property-based: whatever values a user gives the keys, checking the config either accepts it or says why in one
line (ConfigError, or Hydra's and OmegaConf's own errors that dlrt-run puts on one line), never a traceback."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from dlrt.experiments.cli import CONFIG_DIR, _composition_message, register
from dlrt.experiments.validate import ConfigError, validate

KEYS = ["tau", "seed", "epochs", "batch_size", "lr", "threads", "eval_batch_size", "flush_denormal", "selection",
        "svd_on", "precision", "scheduler.name", "scheduler.factor", "scheduler.patience", "finetune.epochs",
        "finetune.method", "model.rank", "model.init", "model.spectrum", "method.r_min", "method.r_max",
        "method.state_policy", "method.absolute_tau", "optim.momentum", "data.subset", "data.n_train", "data.n_val",
        "data.num_classes", "data.input_shape", "data.noise", "foo", "model.width"]
VALUES = st.one_of(st.integers(-3, 600), st.floats(-2, 3, allow_subnormal=False), st.sampled_from([float("nan"), float("inf")]), st.booleans(), st.none(),
                   st.sampled_from(["abc", "", "svd", "authors", "pow2", "final", "host", "nope", "[1,8,8]",
                                    "[3,32,32]", "[10,20,30]", "1e30", "inf", "nan", "null", "[2,0]"]),
                   st.lists(st.integers(-1, 40), max_size=4))


def as_override(key, value) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "[" + ",".join(map(str, value)) + "]"
    else:
        text = str(value)
    return f"{key}={text}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["mnist", "synthetic"]), st.sampled_from(["lenet5", "fc"]),
       st.sampled_from(["adaptive", "fixed", "dense", "vanilla"]), st.lists(st.tuples(st.sampled_from(KEYS), VALUES),
                                                                          max_size=3))
@example("synthetic", "fc", "adaptive", [("model.width", -3)])  # found by this test: a traceback before
@example("synthetic", "lenet5", "adaptive", [("data.noise", float("nan"))])  # found too: accepted
def test_any_values_are_accepted_or_refused_in_one_line(data, model, method, pairs):
    register()
    overrides = [f"data={data}", f"model={model}", f"method={method}", "data.subset=null" if data == "mnist" else "seed=0"]
    overrides += [as_override(key, value) for key, value in pairs]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)
    except ConfigError as e:
        assert "\n" not in str(e)
    except (HydraException, OmegaConfBaseException) as e:
        assert "\n" not in _composition_message(e)
