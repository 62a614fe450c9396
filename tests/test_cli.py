"""dlrt-run: config composition, a real end-to-end run on synthetic data, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from dlrt.cli import CONFIG_DIR, _options, check_overrides
from dlrt.train import validate

REPO = Path(__file__).resolve().parent.parent
QUICK = ["data=synthetic", "data.n_train=256", "data.n_val=64", "data.n_test=64", "epochs=1", "progress=false"]


def dlrt_run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dlrt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("method", _options("method"))
def test_every_model_and_method_composes_and_validates(model, method):
    authors = ["model.init=authors", "model.spectrum=one"] if method == "vanilla_frozen_convs" else []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"method={method}", *authors])
    validate(cfg)
    assert cfg.model.name == model and cfg.method.name == method


def test_defaults_follow_the_papers_protocol_per_model():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        lenet = compose("config", overrides=["model=lenet5"])
        fc = compose("config", overrides=["model=fc"])
        fc784 = compose("config", overrides=["model=fc", "model.width=784", "optim=sgd", "lr=0.1"])
    assert (lenet.optim.name, lenet.lr, lenet.batch_size, lenet.epochs, lenet.data.split) == ("sgd", 0.05, 128, 20, "paper")
    assert (fc.optim.name, fc.lr, fc.batch_size, fc.model.width) == ("adam", 0.001, 256, 500)
    assert (fc784.optim.name, fc784.lr, fc784.model.width) == ("sgd", 0.1, 784)


def test_end_to_end_run_on_synthetic_data(tmp_path):
    result = dlrt_run("model=lenet5", "tau=0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "lenet5-synthetic-adaptive-tau0.3-seed0_data.n_test=64,data.n_train=256,data.n_val=64,epochs=1"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best_model.pt", "checkpoint.pt", "config.yaml", "epochs.csv", "summary.json"]
    epochs = pd.read_csv(run_dir / "epochs.csv")
    for column in ["epoch", "train_loss", "val_loss", "val_acc", "test_acc", "ranks", "rank_0", "rank_1", "rank_2",
                   "params_eval_honest", "params_eval_paper", "cr_eval_honest", "cr_train_paper", "epoch_time_s"]:
        assert column in epochs.columns
    assert len(epochs) == 1
    full = [20, 50, 500]  # the full ranks of LeNet5's low-rank layers
    assert all(epochs[f"rank_{i}"].iloc[0] < full[i] for i in range(3))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["selected_epoch"] == 1

    again = dlrt_run("model=lenet5", "tau=0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stderr and "already finished" in again.stderr


def test_multirun_sweep_makes_one_folder_per_job(tmp_path):
    result = dlrt_run("-m", "model=fc", "model.width=32", "tau=0.1,0.3", "seed=0,1", *QUICK, f"out_dir={tmp_path}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    assert {json.loads(p.read_text())["tau"] for p in summaries} == {0.1, 0.3}


def test_joblib_launcher_runs_a_sweep_two_at_a_time(tmp_path):
    result = dlrt_run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=fc", "model.width=32",
                      "finetune.epochs=0", "tau=0.1,0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


@pytest.mark.parametrize("args,message", [
    (["model=resnet9"], "unknown model 'resnet9': choose one of fc, lenet5"),
    (["data=cifar100"], "unknown data 'cifar100': choose one of"),
    (["method=magic"], "unknown method 'magic': choose one of adaptive, dense, fixed, parallel, vanilla"),
    (["tau=1.5"], "tau=1.5 is outside [0, 1)"),
    (["tau=-0.1"], "tau=-0.1 is outside [0, 1)"),
    (["epochs=0"], "epochs=0 must be a positive integer"),
    (["batch_size=-4"], "batch_size=-4 must be a positive integer"),
    (["lr=0"], "lr=0 must be a positive number"),
    (["model.rank=[10,60,20]"], "rank 60 is larger than layer 2 (3, a 50x500 weight) allows"),
    (["model.rank=[10,20]"], "model.rank: 2 ranks given for 3 layers to convert"),
    (["no_such_key=1"], "Could not override 'no_such_key'"),
    (["-m", "tau=0.1,2.0"], "tau=2.0 is outside [0, 1)"),
    (["optim=rmsprop"], "unknown optim 'rmsprop'"),
    (["threads=0"], "threads=0 must be a positive integer"),
    (["flush_denormal=maybe"], "flush_denormal=maybe must be true or false"),
    (["svd_on=gpu"], "svd_on=gpu is unknown: choose auto, device, host"),
    (["data.subset=0"], "data.subset=0 must be a positive integer"),
    (["finetune.method=sgd"], "finetune.method=sgd is unknown"),
    (["scheduler.name=cosine"], "scheduler.name=cosine is unknown"),
    (["model.spectrum=flat"], "unknown spectrum 'flat'"),
    (["+unknown.key=1"], "dlrt has no setting 'unknown.key'"),
    (["tua=0.1"], "Could not override 'tua'"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        check_overrides([*args, f"out_dir={tmp_path}"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no run folder, no partial files


@pytest.mark.parametrize("args,message", [(["tau=1.5"], "tau=1.5 is outside [0, 1)"),
                                          (["model=resnet9"], "unknown model 'resnet9'")])
def test_the_command_exits_with_code_2_on_bad_input(tmp_path, args, message):
    result = dlrt_run(*args, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []
