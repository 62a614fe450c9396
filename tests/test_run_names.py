"""Run folders follow the resolved settings: the committed records keep their names for the commands that made them,
a config group of the user's own never shares a folder with ours, and a folder whose config.yaml says something else
than the command is refused in one line instead of being skipped or resumed."""

import json
import shlex
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from dlrt.experiments.runner import run_name

from helpers import QUICK, compose_config, hydra_on_our_configs, run_in_process

RESULTS = Path(__file__).resolve().parent.parent / "results" / "runs"
SWEEP = "threads=1 progress=false out_dir=results/runs"

# The records under results/runs and the runs of the queue being trained now: the same command finds the same
# folder, so that a sweep skips the finished ones and resumes the others.
COMMITTED = {
    "experiment=lenet5_mnist tau=0.15 seed=0": "lenet5_mnist/lenet5-mnist-adaptive-tau0.15-seed0",
    "experiment=lenet5_mnist tau=0.45 seed=4": "lenet5_mnist/lenet5-mnist-adaptive-tau0.45-seed4",
    "experiment=lenet5_mnist method=dense tau=0 epochs=10 seed=2": "lenet5_mnist/lenet5-mnist-dense-tau0.0-seed2_epochs=10",
    "experiment=dlrt_vs_uv_authors method=fixed model.spectrum=one seed=0":
        "dlrt_vs_uv_authors/lenet5-mnist-fixed-tau0.0-seed0_model.spectrum=one",
    "experiment=dlrt_vs_uv_authors method=vanilla_frozen_convs model.spectrum=pow10 seed=2":
        "dlrt_vs_uv_authors/lenet5-mnist-vanilla_frozen_convs-tau0.0-seed2_model.spectrum=pow10",
    "experiment=fc_mnist model.width=500 tau=0.09 seed=0": "fc_mnist/fc-mnist-adaptive+fixed100-tau0.09-seed0",
    "experiment=fc_mnist model.width=784 tau=0.17 seed=0": "fc_mnist/fc-mnist-adaptive+fixed100-tau0.17-seed0_model.width=784",
    "experiment=fc_mnist model.width=500 method=dense tau=0 seed=0": "fc_mnist/fc-mnist-dense-tau0.0-seed0",
    "experiment=fc_mnist model.width=784 method=dense tau=0 seed=0": "fc_mnist/fc-mnist-dense-tau0.0-seed0_model.width=784",
    "experiment=lenet5_mnist model.init=svd tau=0.2 seed=1": "lenet5_mnist/lenet5-mnist-adaptive-tau0.2-seed1_model.init=svd",
}


def composed(overrides: list[str], config_dir: Path | None = None):
    """The job config dlrt-run composes for these overrides, and its run name as the job names it."""
    cfg = compose_config(overrides, with_hydra=True, config_dir=config_dir)
    HydraConfig.instance().set_config(cfg)  # the name reads the experiment chosen from Hydra's runtime choices
    with hydra_on_our_configs():  # and composes the defaults it names the run against
        return cfg, run_name(cfg)


def name_of(overrides: list[str]) -> str:
    return composed(overrides)[1]


@pytest.mark.parametrize("command", COMMITTED)
def test_the_committed_records_keep_their_names(command):
    assert name_of([*shlex.split(SWEEP), *shlex.split(command)]) == COMMITTED[command]


def test_every_committed_record_is_found_by_the_command_in_its_summary():
    """Its summary's command composes to its folder's name (or the name an older version gave the same run, which
    the runner also looks for) and to the settings of its config.yaml."""
    from dlrt.experiments.run_folder import RunFolder
    from dlrt.experiments.runner import config_differences, folder_names

    summaries = sorted(RESULTS.glob("*/*/summary.json"))
    assert len(summaries) >= 50
    for path in summaries:
        args = [a for a in shlex.split(json.loads(path.read_text())["command"])[1:] if a not in ("-m", "dlrt.cli", "dlrt.experiments")]
        cfg, name = composed(args)
        assert f"{path.parent.parent.name}/{path.parent.name}" in folder_names(cfg, name), path
        assert not config_differences(RunFolder(path.parent).config(), cfg), path


@pytest.fixture
def myconf(tmp_path) -> Path:
    """A user's own method option: ours with other settings."""
    (tmp_path / "myconf" / "method").mkdir(parents=True)
    (tmp_path / "myconf" / "method" / "myadapt.yaml").write_text(
        "defaults:\n  - adaptive\n  - _self_\nr_min: 3\nstate_policy: reset\n")
    (tmp_path / "myconf" / "method" / "same.yaml").write_text("defaults:\n  - adaptive\n  - _self_\nr_min: 2\n")
    return tmp_path / "myconf"


def test_a_users_own_option_is_named_by_what_it_changes(myconf):
    ours = composed(["method=adaptive"], myconf)[1]
    theirs = composed(["method=myadapt"], myconf)[1]
    assert ours == "lenet5-mnist-adaptive-tau0.15-seed0"
    assert theirs == "lenet5-mnist-adaptive-tau0.15-seed0_method.r_min=3,method.state_policy=reset"
    assert composed(["method=same"], myconf)[1] == ours  # the same settings: the same run


def test_a_users_own_option_does_not_skip_as_ours(myconf, tmp_path, monkeypatch, capsys):
    for method in ("adaptive", "myadapt"):
        code, err = run_in_process(["-cd", str(myconf), f"method={method}", *QUICK, "out_dir=runs"], tmp_path,
                                   monkeypatch, capsys)
        assert code == 0 and "skipping" not in err, err
    assert len(list((tmp_path / "runs").glob("*/summary.json"))) == 2


def test_a_hand_edited_config_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "tau=0.15", "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    (config,) = tmp_path.glob("runs/*/config.yaml")
    config.write_text(config.read_text().replace("tau: 0.15", "tau: 0.3"))
    (config.parent / "summary.json").unlink()  # an unfinished run: the command would resume it
    code, err = run_in_process([*QUICK, "tau=0.15", "out_dir=runs", "eval_batch_size=32"], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "tau=0.3 in its config.yaml, 0.15 in this command" in err
    assert not (config.parent / "summary.json").exists()


def test_keys_that_change_nothing_computed_may_differ_on_resume(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "out_dir=runs", "eval_batch_size=64"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    code, err = run_in_process([*QUICK, "out_dir=runs", "eval_batch_size=32", "svd_on=host"], tmp_path, monkeypatch,
                               capsys)
    assert code == 0 and "already finished" in err, err


def test_a_folder_named_by_an_older_version_is_found(tmp_path, monkeypatch, capsys):
    """Before the schema made ϑ a float, `tau=0` named its folder tau0: the same command skips it."""
    code, err = run_in_process([*QUICK, "method=dense", "tau=0", "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    assert "-tau0.0-" in folder.name
    folder.rename(folder.with_name(folder.name.replace("-tau0.0-", "-tau0-")))
    code, err = run_in_process([*QUICK, "method=dense", "tau=0", "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "already finished" in err and "-tau0-" in err, err


def test_dense_runs_print_no_tau(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "method=dense", "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("lenet5-synthetic-dense-tau0.15-seed0")  # the name stays: sweeps find their runs
    said = err.replace(folder.name, "")
    assert "ϑ" not in said and "tau" not in said and "1 dense epoch," in said, err


def test_a_name_too_long_for_the_file_system_is_shortened_and_stays_distinct():
    many = ["data=synthetic", "data.n_train=1001", "data.n_val=1002", "data.n_test=1003", "data.noise=0.123456789",
            "epochs=7", "batch_size=77", "optim.momentum=0.123456789", "scheduler.name=plateau",
            "scheduler.factor=0.123456789", "scheduler.patience=17", "method.r_min=3", "method.r_max=33",
            "method.state_policy=reset", "model.rank=[3,4,5]", "selection=final", "precision=bf16",
            "data.input_shape=[1,32,32]", "data.num_classes=7"]
    first, second = name_of(many), name_of([*many, "seed=1"])
    assert len(first.encode()) <= 255 and len(second.encode()) <= 255 and first != second
    assert first.startswith("lenet5-synthetic-adaptive-tau0.15-seed0_")
