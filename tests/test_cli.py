"""dlrt-run: config composition, real runs on synthetic data, Hydra's features, and every misuse answered in one
line (exit 2, nothing left behind)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dlrt.experiments.cli import CONFIG_DIR
from dlrt.experiments.validate import validate

from helpers import QUICK, compose_config, dlrt_run, python, run_in_process, start_dlrt_run


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("method", options("method"))
def test_every_model_and_method_composes_and_validates(model, method):
    authors = ["model.init=authors", "model.spectrum=one"] if method == "vanilla_frozen_convs" else []
    cfg = compose_config([f"model={model}", f"method={method}", *authors])
    validate(cfg)
    # every value is given and every interpolation resolves (a key one model or method lacks would raise here)
    assert not OmegaConf.missing_keys(cfg)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    # the names come from the option files, not from the override: a file copied from another that kept the other's
    # name would train the other model or method under this one's name
    assert (cfg.model.name, cfg.method.name) == (model, method)


def test_defaults_follow_the_papers_recipe_per_model_and_an_optimizer_choice():
    lenet, fc = compose_config(["model=lenet5"]), compose_config(["model=fc"])
    fc_sgd, lenet_adam = compose_config(["model=fc", "optim=sgd"]), compose_config(["optim=adam"])
    assert (lenet.optim.name, lenet.lr, lenet.batch_size, lenet.epochs, lenet.data.split) == ("sgd", 0.05, 128, 20, "paper")
    assert (fc.optim.name, fc.lr, fc.batch_size, fc.epochs, fc.finetune.epochs) == ("adam", 0.001, 256, 250, 100)
    assert (fc_sgd.optim.name, fc_sgd.lr) == ("sgd", 0.05)
    assert (lenet_adam.optim.name, lenet_adam.lr) == ("adam", 0.001)  # not the SGD recipe's 0.05
    assert "momentum" not in fc.optim and "betas" not in lenet.optim  # each group holds its own keys only


def test_end_to_end_run_on_synthetic_data(tmp_path):
    result = dlrt_run("model=lenet5", "tau=0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "lenet5-synthetic-adaptive-tau0.3-seed0_data.n_test=64,data.n_train=256,data.n_val=64,epochs=1"
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == [
        "best_model.pt", "checkpoint.pt", "config.yaml", "epochs.csv", "summary.json"]
    epochs = pd.read_csv(run_dir / "epochs.csv")
    for column in ["epoch", "train_loss", "val_loss", "val_acc", "test_acc", "ranks", "rank_0", "rank_1", "rank_2",
                   "params_eval_honest", "params_eval_paper", "cr_eval_honest", "cr_train_paper", "epoch_time_s"]:
        assert column in epochs.columns
    assert len(epochs) == 1
    full = [20, 50, 500]  # the full ranks of LeNet5's low-rank layers
    assert all(epochs[f"rank_{i}"].iloc[0] < full[i] for i in range(3))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["selected_epoch"] == 1
    assert summary["command"].startswith("python -m dlrt.experiments model=lenet5 tau=0.3 data=synthetic")

    again = dlrt_run("model=lenet5", "tau=0.3", *QUICK, "lr=0.05", "threads=2", f"out_dir={tmp_path}", cwd=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stderr and "already finished" in again.stderr  # same folder


def test_folder_names_ignore_defaults_and_where_things_run_and_name_the_fine_tuning(monkeypatch, tmp_path, capsys):
    """lr=0.05 is LeNet5's default; where the SVDs run, the threads, the device and the evaluation batch change
    nothing computed: the same folder. model=fc adds the recipe's fine-tuning epochs, and says so."""
    names = {}
    for args in (["lr=0.05"], ["svd_on=host", "threads=2", "device=cpu", "eval_batch_size=16"], ["model=fc", "model.width=16"]):
        code, err = run_in_process([*QUICK, *args, "epochs=1", "data.n_train=64", f"out_dir={tmp_path}", "tau=0.5",
                                    "finetune.epochs=1" if "model=fc" in args else "seed=0"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        names[args[0]] = err.split("run folder: ")[1].split("\n")[0] if "run folder" in err else err
    assert "skipping" in names["svd_on=host"]  # the lr=0.05 run's folder
    assert names["model=fc"].endswith("fc-synthetic-adaptive+fixed1-tau0.5-seed0_data.n_test=64,data.n_train=64,"
                                      "data.n_val=64,epochs=1,finetune.epochs=1,model.width=16")


def test_multirun_sweep_with_sweep_functions_makes_one_folder_per_job(tmp_path):
    result = dlrt_run("-m", "model=fc", "model.width=32", "finetune.epochs=0", "tau=choice(0.1,0.3)", "seed=range(2)",
                      *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    assert {json.loads(p.read_text())["tau"] for p in summaries} == {0.1, 0.3}


def test_a_failed_job_does_not_end_the_sweep_which_lists_it(tmp_path):
    result = dlrt_run("-m", "lr=1e30,0.05", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "1 job(s) of the sweep failed" in result.stderr and "job 0 (lr=1e+30" in result.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("*/summary.json"))
    assert statuses == ["completed", "failed"]


def test_a_sweep_checks_every_job_before_it_runs_any(tmp_path):
    result = dlrt_run("-m", "tau=0.1,0.2,1.5", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "job 2 (tau=1.5" in result.stderr and "must be in [0, 1)" in result.stderr
    assert not list(tmp_path.glob("*/summary.json"))


def test_joblib_launcher_runs_a_sweep_two_at_a_time(tmp_path):
    result = dlrt_run("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=fc", "model.width=32",
                      "finetune.epochs=0", "tau=0.1,0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


def test_a_users_own_config_folder_extends_ours(tmp_path):
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "mylenet.yaml").write_text("defaults:\n  - lenet5\n  - _self_\nrank: [4, 6, 8]\n")
    result = dlrt_run("-cd", "myconf", "model=mylenet", *QUICK, f"out_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert pd.read_csv(run_dir / "epochs.csv")["ranks"].iloc[0] != "10 25 250"
    assert run_dir.name.startswith("lenet5-synthetic-adaptive") and "model.rank=[4,6,8]" in run_dir.name  # what it changes


def test_shell_completion_installs():
    result = dlrt_run("-sc", "install=bash", cwd=None, timeout=120)
    assert result.returncode == 0 and "hydra_bash_completion" in result.stdout


def test_help_lists_groups_and_resolved_keys_without_importing_torch():
    code = "import sys; from dlrt.experiments import cli; print(cli.app_help(['model=fc'])); print('torch' in sys.modules)"
    out = python("-c", code, timeout=120).stdout
    assert "model: fc, lenet5, resnet50, vgg16" in out and "epochs: 250" in out and "lr: 0.001" in out
    assert out.strip().endswith("False")  # --help stays fast: no torch, no trainer


@pytest.mark.parametrize("args", [["--help"], ["-sc", "install=bash"]], ids=["help", "completion"])
def test_output_into_a_pipe_whose_reader_left_ends_quietly(tmp_path, args):
    """`dlrt-run --help | head -3`: head has left when the rest is written. Python's docs on SIGPIPE: exit 1, no
    traceback (the reader here leaves before anything is written, so that every write fails)."""
    read, write = os.pipe()
    os.close(read)
    process = start_dlrt_run(*args, cwd=tmp_path, stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (1, "")


def test_two_identical_runs_at_once_one_says_the_folder_is_in_use(tmp_path):
    args = [*QUICK, "epochs=4", "data.n_train=2048", f"out_dir={tmp_path}"]
    first = start_dlrt_run(*args, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/config.yaml")) and time.time() < deadline:  # the first holds the folder now
        time.sleep(0.1)
    second = dlrt_run(*args, cwd=tmp_path)
    assert second.returncode == 2 and "is in use by another dlrt-run" in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()


ERRORS = [  # args, message fragment: every misuse of the list, each one line, exit 2, no folder
    (["seed=abc"], "seed: Value 'abc' of type 'str' could not be converted to Integer"),
    (["seed=1.5"], "seed: Value '1.5' of type 'float' could not be converted to Integer"),
    (["epochs=true"], "epochs: Value 'True' of type 'bool' could not be converted to Integer"),
    (["tau=abc"], "tau: Value 'abc' of type 'str' could not be converted to Float"),
    (["tau=1.5"], "tau=1.5: tau (relative truncation tolerance) must be in [0, 1)"),
    (["tau=-0.1"], "tau=-0.1: tau (relative truncation tolerance) must be in [0, 1)"),
    (["epochs=0"], "epochs=0 must be a number >= 1"),
    (["batch_size=-4"], "batch_size=-4 must be a number >= 1"),
    (["lr=0"], "lr=0.0 must be > 0"),
    (["model=resnet9"], "unknown model 'resnet9': choose one of fc, lenet5, resnet50, vgg16"),
    (["data=cifar100"], "unknown data 'cifar100': choose one of cifar10, fashion_mnist, imagenet, mnist, synthetic"),
    (["method=magic"], "unknown method 'magic': choose one of adaptive, dense, fixed, parallel, vanilla"),
    (["optim=rmsprop"], "unknown optim 'rmsprop': choose one of adam, sgd"),
    (["foo=1"], "unknown key 'foo': dlrt-run has no such setting"),
    (["+foo=1"], "unknown key 'foo': dlrt-run has no such setting"),
    (["tua=0.1"], "unknown key 'tua'"),
    (["++method.rmax=3"], "method.rmax: method 'adaptive' has no such key, so it would be ignored"),
    (["++data.noise=inf", "data=mnist"], "data.noise: data 'mnist' has no such key"),
    (["optim.betas=[0.9,0.99]"], "unknown key 'optim.betas'"),  # betas are Adam's, and the optimizer is SGD
    (["method.r_min=0"], "method.r_min=0: r_min must be an integer >= 1"),
    (["method.r_max=1"], "method.r_max=1: r_max must be None or an integer >= r_min = 2"),
    (["method.state_policy=nope"],
     "method.state_policy: Invalid value 'nope', expected one of [project, keep, reset, restart]"),
    (["optim.momentum=-1"], "optim.momentum=-1.0: momentum must be a number in [0, 1)"),
    (["optim=adam", "optim.betas=[2,0]"], "optim.betas=[2.0, 0.0]: betas must be two numbers in [0, 1)"),
    (["scheduler.factor=2"], "scheduler.factor=2.0 must be in (0, 1)"),
    (["scheduler.name=cosine"], "scheduler.name: Invalid value 'cosine', expected one of [none, plateau]"),
    (["finetune.method=sgd"], "finetune.method: Invalid value 'sgd', expected one of [fixed, s_only]"),
    (["threads=0"], "threads=0 must be a number >= 1 or null"),
    (["flush_denormal=maybe"], "flush_denormal: Value 'maybe' is not a valid bool"),
    (["svd_on=gpu"], "svd_on: Invalid value 'gpu', expected one of [auto, device, host]"),
    (["data.subset=0"], "data.subset=0 must be a number >= 1 or null"),
    (["model.spectrum=flat"], "model.spectrum: Invalid value 'flat', expected one of [one, pow2, pow10]"),
    (["model.rank=[10,60,20]"], "rank 60 is larger than layer 2 (3, a 50x500 weight) allows"),
    (["model.rank=[10,20]"], "model.rank: 2 ranks given for 3 layers to convert"),
    (["model.rank=2.5"], "model.rank: a fractional rank must be in (0, 1], got 2.5"),
    (["model.rank=0"], "model.rank: rank must be an integer >= 1"),
    (["data=synthetic", "data.n_train=0"], "data.n_train=0 must be a number >= 1"),
    (["data=synthetic", "data.noise=nan"], "data.noise=nan is not a finite float32 number"),
    (["lr=inf"], "lr=inf is not a finite float32 number"),
    (["lr=1e300"], "lr=1e+300 is not a finite float32 number"),  # inf in float32: an SVD that fails
    (["method.absolute_tau=true", "tau=inf"], "tau=inf is not a finite float32 number"),
    (["optim=adam", "optim.eps=inf"], "optim.eps=inf is not a finite float32 number"),
    (["seed=99999999999999999999"], "seed=99999999999999999999 is larger than an int64 holds"),
    (["epochs=99999999999"], "is more than 1000000 epochs in all"),
    (["threads=100000"], "threads=100000 is more than the"),
    (["model=fc", "model.width=4611686018427387904"], "the model cannot be built at these sizes"),
    (["model=fc", "model.width=1000000"], "parameters"),
    (["data=synthetic", "data.n_train=1000000000000"], "GiB of generated data, more than this machine's"),
    (["out_dir="], "out_dir is empty"),
    (["out_dir=''"], "out_dir is empty"),
    (["data.root="], "data.root is empty"),
    (["out_dir=" + "x" * 300], "a folder name longer than 255 bytes"),
    (["foo=1"], "docs/runner.md list"),
    (["model=fc", "model.width=0"], "model.width=0 must be a number >= 1"),
    (["data=synthetic", "data.input_shape=[1,8,8]"], "lenet5 needs inputs of at least 16x16 pixels, got 8x8"),
    (["data=synthetic", "data.input_shape=[28,28]"], "data.input_shape=[28, 28] must be three positive sizes"),
    (["data.split=train_test"], "data.split=train_test has no validation set: set selection=final"),
    (["method=vanilla_frozen_convs"], "it needs model.init=authors and a model.spectrum"),
    (["data=cifar10", "data.root=nonexistent"], "data.root=nonexistent is no folder"),
    (["out_dir=a_file"], "out_dir=a_file is a file, not a folder"),
    (["device=cuda"], "device=cuda but no CUDA device is available"),
    (["cuda_graphs=true"], "cuda_graphs=true needs a CUDA device"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_every_misuse_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_in_process([*args, "progress=false"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no data folder, no partial files


def test_an_unwritable_out_dir_is_refused_before_any_data_is_loaded(tmp_path, monkeypatch, capsys):
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked")  # root may write anywhere
    code, err = run_in_process(["out_dir=locked/runs", "progress=false"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "cannot be written by this user" in err and len(err.strip().splitlines()) == 1


def test_a_run_folder_with_a_broken_summary_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    (summary,) = tmp_path.glob("runs/*/summary.json")
    summary.write_text('{"status": "comp')  # truncated
    code, err = run_in_process([*QUICK, "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "summary.json cannot be read" in err and len(err.strip().splitlines()) == 1
