"""Property-based: whatever values a user gives the keys, checking the config either accepts it or says why in one
line (ConfigError, or Hydra's and OmegaConf's own errors that dlrt-run puts on one line), never a traceback; and a
config that is accepted trains (or fails as a run, exit 1) without a traceback."""

import dataclasses
import tempfile

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from dlrt.experiments import schema
from dlrt.experiments.cli import _composition_message
from dlrt.experiments.validate import ConfigError, validate

from helpers import compose_config, run_in_process


def schema_keys() -> list[str]:
    """Every key of dlrt-run: the top level's and those of every group option's schema."""
    def keys(node, prefix=""):
        for f in dataclasses.fields(node):
            if f.name in ("model", "data", "method", "optim"):
                continue
            kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(kind):
                yield from keys(kind, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name
    groups = [("model", schema.FCModelSchema), ("data", schema.SyntheticDataSchema),
              ("data", schema.ArrayDataSchema), ("data", schema.ImageDataSchema),
              ("method", schema.AdaptiveMethodSchema), ("optim", schema.SGDSchema), ("optim", schema.AdamSchema)]
    found = list(keys(schema.RunSchema))
    found += [f"{group}.{f.name}" for group, node in groups for f in dataclasses.fields(node) if f.name != "name"]
    return sorted(set(found))


KEYS = schema_keys() + ["foo"]
VALUES = st.one_of(st.integers(-3, 600), st.floats(-2, 3, allow_subnormal=False),
                   st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e300, -1e300, 3.5e38, 1e-300]),
                   st.sampled_from([2**63, 2**64 + 1, 2**62, -(2**63) - 1, 10**12]),
                   st.booleans(), st.none(),
                   st.sampled_from(["abc", "", "''", "svd", "authors", "pow2", "final", "host", "nope", "[1,8,8]",
                                    "[3,32,32]", "[10,20,30]", "1e30", "inf", "-inf", "nan", "null", "[2,0]",
                                    "x" * 300, "a/" * 3, "/", "/dev/null", "[nan,inf]", "[1,1e9,1e9]"]),
                   st.lists(st.integers(-1, 40), max_size=4))


def test_the_keys_are_every_key_of_the_schema():
    assert {"tau", "lr", "out_dir", "data.root", "optim.eps", "optim.betas", "method.r_max", "finetune.epochs",
            "scheduler.factor", "model.width", "data.workers", "data.input_shape"} <= set(KEYS)


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


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["mnist", "synthetic", "cifar10"]), st.sampled_from(["lenet5", "fc"]),
       st.sampled_from(["adaptive", "fixed", "dense", "vanilla"]), st.lists(st.tuples(st.sampled_from(KEYS), VALUES),
                                                                          max_size=3))
@example("synthetic", "fc", "adaptive", [("model.width", -3)])  # found by this test: a traceback before
@example("synthetic", "lenet5", "adaptive", [("data.noise", float("nan"))])  # found too: accepted
@example("synthetic", "fc", "adaptive", [("model.width", 2**64 + 1)])  # an overflow inside torch before
@example("synthetic", "lenet5", "adaptive", [("data.num_classes", 2**64 + 1)])  # the same
@example("mnist", "lenet5", "adaptive", [("lr", float("inf"))])  # accepted before; an SVD traceback in training
@example("mnist", "lenet5", "adaptive", [("lr", 1e300)])  # inf in float32: the same
@example("mnist", "lenet5", "adaptive", [("out_dir", "")])  # accepted before: the run folder went to /
@example("mnist", "lenet5", "adaptive", [("out_dir", "x" * 300)])  # a name no file system takes
@example("mnist", "lenet5", "adaptive", [("data.root", 0)])  # found by this test: Path(0), a TypeError
def test_any_values_are_accepted_or_refused_in_one_line(data, model, method, pairs):
    overrides = [f"data={data}", f"model={model}", f"method={method}", "data.subset=null" if data == "mnist" else "seed=0"]
    overrides += [as_override(key, value) for key, value in pairs]
    try:
        validate(compose_config(overrides))
    except ConfigError as e:
        assert "\n" not in str(e)
    except (HydraException, OmegaConfBaseException) as e:
        assert "\n" not in _composition_message(e)


# Keys whose values decide what a tiny run computes; sizes and epochs stay tiny (they are the first test's).
RUN_KEYS = [k for k in KEYS if k not in ("epochs", "finetune.epochs", "data.n_train", "data.n_val", "data.n_test",
                                         "data.input_shape", "batch_size", "eval_batch_size", "data.subset",
                                         "model.width", "out_dir", "data.root", "threads", "device", "progress")]
TINY = ["data=synthetic", "data.n_train=64", "data.n_val=16", "data.n_test=16", "batch_size=32", "epochs=1",
        "progress=false", "threads=1", "model=fc", "model.width=16", "finetune.epochs=1"]


@pytest.mark.filterwarnings("ignore")
# the fixtures serve every example: each sets argv anew, reads its own stderr and trains into a folder of its own
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["adaptive", "parallel", "fixed", "dense", "vanilla"]),
       st.lists(st.tuples(st.sampled_from(RUN_KEYS), VALUES), min_size=1, max_size=3))
@example("adaptive", [("lr", 1e37)])  # finite, and the factors overflow in the step
@example("adaptive", [("optim.eps", 1.6e-223)])  # found by this test: 0 in float32, 0/0 in Adam,
#                                                                    then an SVD's traceback
def test_an_accepted_config_trains_or_fails_in_one_line(tmp_path, monkeypatch, capsys, method, pairs):
    with tempfile.TemporaryDirectory() as out:
        args = [*TINY, f"method={method}", *(as_override(k, v) for k, v in pairs), f"out_dir={out}"]
        code, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    assert code in (0, 1, 2), err
    if code:
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dlrt-run: error:"), err
