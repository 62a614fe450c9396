"""A run folder's config and name hold only what the run reads: ϑ and fine-tuning outside the rank-adaptive methods,
a scheduler's factor and patience without a scheduler and the dense net's init are left out, though every command
may still give them (`method=dense tau=0`). Folders of earlier versions, which record every key, keep being found,
resumed and counted."""

import json

from helpers import compose_config
from omegaconf import OmegaConf
from test_run_names import name_of

from dlrt.experiments import schema
from dlrt.experiments.protocols import Sweep
from dlrt.experiments.runner import config_differences
from dlrt.report import missing

DENSE = ["experiment=lenet5_mnist", "method=dense", "tau=0", "epochs=10"]


def recorded_keys(overrides: list[str]) -> set[str]:
    return set(schema.flatten(schema.recorded(compose_config(overrides))))


def test_the_recorded_config_leaves_out_what_the_method_does_not_read():
    dense = recorded_keys(DENSE)
    assert not {"tau", "model.init", "finetune.epochs", "finetune.method", "scheduler.factor"} & dense
    assert {"model.rank", "lr", "epochs", "scheduler.name"} <= dense
    fixed = recorded_keys(["method=fixed", "tau=0.3"])
    assert "tau" not in fixed and "model.init" in fixed and "method.state_policy" in fixed
    adaptive = recorded_keys(["model=fc", "tau=0.1", "scheduler.name=plateau"])
    assert {"tau", "finetune.epochs", "finetune.method", "scheduler.factor", "scheduler.patience"} <= adaptive
    assert "finetune.method" not in recorded_keys(["model=lenet5"])  # LeNet5's recipe fine-tunes for 0 epochs


def test_a_key_the_run_does_not_read_names_nothing():
    assert name_of([*DENSE, "model.init=svd", "scheduler.factor=0.5"]) == name_of(DENSE) \
        == "lenet5_mnist/lenet5-mnist-dense-tau0.0-seed0_epochs=10"  # (the committed record's tau0 is also looked for)
    assert name_of(["method=fixed", "finetune.epochs=3"]) == name_of(["method=fixed"])
    assert "scheduler.factor=0.5" in name_of(["scheduler.name=plateau", "scheduler.factor=0.5"])


def test_a_folder_of_an_earlier_version_with_every_key_is_the_same_run():
    cfg = compose_config(["method=fixed", "tau=0.3"])
    earlier = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # as dlrt-run wrote it before
    earlier["tau"], earlier["finetune"]["epochs"], earlier["scheduler"]["factor"] = 0.0, 7, 0.5
    assert config_differences(earlier, cfg) == []
    earlier["lr"] = 1.0
    assert [key for key, *_ in config_differences(earlier, cfg)] == ["lr"]


def test_a_dense_folder_without_tau_counts_as_done(tmp_path, monkeypatch):
    monkeypatch.setattr(missing, "SWEEPS", (Sweep("lenet5_mnist", {"seed": (0,)}, {"method": "dense", "tau": 0}),))
    folder = tmp_path / "lenet5_mnist" / "lenet5-mnist-dense-tau0-seed0"
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(schema.recorded(compose_config([*DENSE[:3], "seed=0"]))), folder / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert missing.missing_commands(tmp_path, missing.planned_runs()) == []
