"""Each default is written once: the method's in DLRTOptimizer's signature, the synthetic data's in its generator,
dlrt-run's list of methods in schema.METHODS. The schema and the configs take them from there."""

import inspect

import yaml

from dlrt import DLRTOptimizer
from dlrt.experiments import defaults, schema
from dlrt.experiments.data import arrays
from dlrt.functional import METHODS as FUNCTIONAL_METHODS
from dlrt.update_rules import STATE_POLICIES
from helpers import compose_config

SIGNATURE = {name: p.default for name, p in inspect.signature(DLRTOptimizer).parameters.items()
             if p.default is not inspect.Parameter.empty}


def test_the_defaults_read_from_source_are_those_of_the_imported_modules():
    literal = {name: value for name, value in SIGNATURE.items() if name != "dense_optimizer"}  # None, a literal too
    assert {name: defaults.OPTIMIZER[name] for name in literal} == literal
    assert defaults.SYNTHETIC == arrays._SYNTHETIC_DEFAULTS
    assert defaults.STATE_POLICIES == STATE_POLICIES and tuple(schema.StatePolicy) == STATE_POLICIES


def test_a_composed_config_holds_the_optimizers_and_the_generators_defaults():
    cfg = compose_config(["method=adaptive", "data=synthetic"])
    for key in ("absolute_tau", "r_min", "r_max", "state_policy", "basis_every"):
        assert cfg.method[key] == SIGNATURE[key], key
    assert cfg.optim.momentum == SIGNATURE["momentum"] and cfg.svd_on == SIGNATURE["svd_on"]
    adam = compose_config(["optim=adam"]).optim
    assert tuple(adam.betas) == SIGNATURE["betas"] and adam.eps == SIGNATURE["eps"]
    assert compose_config(["method=fixed"]).method.state_policy == SIGNATURE["state_policy"]
    data = compose_config(["data=synthetic"]).data
    assert {key: tuple(data[key]) if key == "input_shape" else data[key] for key in arrays._SYNTHETIC_DEFAULTS} \
        == arrays._SYNTHETIC_DEFAULTS


def test_no_config_file_writes_a_default_the_schema_fills():
    filled = {"method": ("absolute_tau", "r_min", "r_max", "state_policy", "basis_every"),
              "optim": ("momentum", "betas", "eps"), "data": tuple(arrays._SYNTHETIC_DEFAULTS)}
    for group, keys in filled.items():
        for path in (schema.CONFIG_DIR / group).glob("*.yaml"):
            written = set(yaml.safe_load(path.read_text()) or {}) & set(keys)
            assert not written, f"{path.name} writes {written}: leave them to the schema"


def test_every_method_of_dlrt_run_is_a_config_option_and_steps_as_a_method_of_dlrt():
    options = {path.stem for path in (schema.CONFIG_DIR / "method").glob("*.yaml")}
    assert options == set(schema.METHODS)
    assert {method.steps_as for method in schema.METHODS.values()} <= set(FUNCTIONAL_METHODS)
    assert set(schema.RANK_ADAPTIVE) == {name for name, method in schema.METHODS.items()
                                         if FUNCTIONAL_METHODS[method.steps_as].changes_ranks and name != "dense"}


def test_the_configs_are_the_ones_at_the_top_of_the_checkout():
    from pathlib import Path

    assert schema.CONFIG_DIR.resolve() == Path(__file__).resolve().parents[1] / "configs"


def test_the_runs_optimizer_holds_plain_values_so_a_checkpoint_loads_without_the_harness(tmp_path):
    """The schema's enums (state_policy, svd_on) reach the optimizer as strings: its state_dict, in every
    checkpoint, then loads with torch.load's weights_only, which refuses classes of dlrt.experiments."""
    import torch

    from dlrt.experiments.runtime import make_optimizer
    from helpers import small_mlp

    cfg = compose_config(["method=adaptive", "optim=adam", "data=synthetic", "svd_on=host"])
    opt = make_optimizer(cfg, small_mlp(), "adaptive")
    settings = {key: value for group in opt.low_rank_groups for key, value in group.items()
                if key not in ("layers", "params")}
    assert all(type(value) in (int, float, bool, str, tuple, type(None)) for value in settings.values()), settings
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.load(tmp_path / "opt.pt", weights_only=True)
