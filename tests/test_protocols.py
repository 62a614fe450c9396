"""protocols.py is the one source of the paper's protocols: the experiment configs read their sweeps and selection
rules from it, and what they compose is what each table's header checks runs against."""

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from dlrt.experiments import protocols
from dlrt.experiments.protocols import EXPERIMENTS, SWEEPS


def sweeper_params(experiment: str) -> dict:
    from hydra import compose, initialize_config_dir

    from dlrt.experiments.cli import CONFIG_DIR, register

    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_the_experiments_sweep_is_the_protocols(experiment):
    _, sweep = EXPERIMENTS[experiment]
    assert sweeper_params(experiment) == {key: ",".join(map(str, values)) for key, values in sweep.grid.items()}


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda sweep: sweep.command())
def test_every_sweep_composes_to_its_tables_protocol(sweep):
    """The first run of each sweep has the settings its table's header checks (no departure from the paper)."""
    protocol, _ = EXPERIMENTS[sweep.experiment]
    run = sweep.runs()[0]
    cfg = OmegaConf.to_container(compose_config([f"{key}={value}" for key, value in run.items()]), resolve=True)
    flat = {}
    for key, value in protocol.expected(cfg["method"]["name"]).items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        flat[key] = node
    assert flat == protocol.expected(cfg["method"]["name"])


def test_the_resolver_names_what_an_experiment_sweeps():
    assert protocols.recipe_value("fc_mnist", "selection") == "final"
    assert protocols.recipe_value("lenet5_mnist", "tau") == "0.09,0.11,0.13,0.15,0.2,0.3,0.4,0.45"
    assert protocols.recipe_value("dlrt_vs_uv", "model.rank") == 20  # a setting of its table's protocol
    with pytest.raises(ValueError, match="sweeps tau, seed and sets epochs, .*, not 'optim.momentum'"):
        protocols.recipe_value("lenet5_mnist", "optim.momentum")


def test_the_seeds_issue_24_asks_for():
    assert protocols.UV_AUTHORS.grid["seed"] == tuple(range(10))
    assert protocols.UV_OURS.grid["seed"] == tuple(range(5))
    assert protocols.LENET5_DENSE.fixed == {"method": "dense", "tau": 0, "epochs": 10}
    # the short runs that finish their tables first, then the FC tables
    assert SWEEPS[:4] == (protocols.LENET5_DENSE, protocols.LENET5_BASIS_EVERY, protocols.FC_DLRT, protocols.FC_DENSE)


def test_each_imagenet_row_is_the_imagenet_experiment_with_its_model():
    for model in ("resnet50", "vgg16"):
        row = OmegaConf.to_container(compose_config([f"experiment=imagenet_{model}"]), resolve=True)
        assert row == OmegaConf.to_container(compose_config(["experiment=imagenet", f"model={model}"]), resolve=True)
        assert (row["model"]["name"], row["tau"], row["epochs"], row["finetune"]) == (
            model, 0.1, protocols.RECIPES[model].epochs, {"method": "s_only", "epochs": 100, "state_policy": None})
