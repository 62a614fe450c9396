"""Runs that survive a crash, stop cleanly on NaN, export what they selected, and refuse bad input."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import dlrt.experiments.data
from dlrt.experiments.data import DataError, DataSplits, load_device_data
from dlrt.experiments.data.arrays import Split
from dlrt.export import load_exported
from dlrt.experiments.export import export_run
from dlrt.experiments.run_folder import RunFolder, RunFolderError
from dlrt.experiments.runtime import configure_cpu
from dlrt.experiments.train import TrainingDiverged, evaluate, train

from helpers import QUICK, compose_config, run_in_process, start_dlrt_run

# runs long enough (epochs of 2048 examples) to be stopped in the middle of one
SMALL = [*QUICK, "data.n_train=2048", "data.n_val=256", "data.n_test=256", "model.rank=4"]


def start_run(out_dir, *args):
    return start_dlrt_run(*SMALL, f"out_dir={out_dir}", *args, cwd=out_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def only_run_dir(out_dir: Path) -> Path:
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    return run_dir


def wait_for_epochs(run_dir_parent: Path, count: int, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        csvs = list(run_dir_parent.glob("*/epochs.csv"))
        if csvs and len(pd.read_csv(csvs[0])) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not reach the expected epoch in time")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, how):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir(), interrupted.mkdir()
    full = start_run(reference, "epochs=4")
    assert full.wait(timeout=300) == 0, full.communicate()

    process = start_run(interrupted, "epochs=4")
    wait_for_epochs(interrupted, 2, process)
    process.send_signal(how)
    code = process.wait(timeout=60)
    assert code == (-9 if how == signal.SIGKILL else 130)
    if how == signal.SIGTERM:
        assert "run the same command to resume" in process.communicate()[1]
    resumed = start_run(interrupted, "epochs=4")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err

    ours, theirs = pd.read_csv(only_run_dir(interrupted) / "epochs.csv"), pd.read_csv(only_run_dir(reference) / "epochs.csv")
    assert list(ours["epoch"]) == [1, 2, 3, 4]  # each epoch exactly once
    columns = ["train_loss", "val_loss", "test_acc", "ranks", "params_eval_honest"]
    pd.testing.assert_frame_equal(ours[columns], theirs[columns])


def compose_cfg(*overrides, small=True):
    return compose_config([*(SMALL if small else []), *overrides])


def train_into(cfg, path: Path) -> dict:
    """What dlrt-run does with a run folder: claim it, then train into it."""
    folder = RunFolder(path)
    with folder.claim():
        return train(cfg, folder)


def test_nan_in_the_data_marks_the_run_failed(tmp_path, monkeypatch):
    cfg = compose_cfg("epochs=3")
    real_load = dlrt.experiments.data.load_data

    def poisoned(*args, **kwargs):
        data = real_load(*args, **kwargs)
        x = data.train.x.clone()
        x[1000:1100] = float("nan")  # some batch of the first epoch
        return DataSplits(Split(x, data.train.y), data.val, data.test, data.input_shape, data.num_classes)

    monkeypatch.setattr(dlrt.experiments.data, "load_data", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan in epoch 1; no epoch had finished, so there is no "
                                               "checkpoint"):
        train_into(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "nan" in summary["reason"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_export_round_trip_in_both_formats(tmp_path, precision):
    cfg = compose_cfg("epochs=2", "tau=0.2", f"precision={precision}")
    run_dir = tmp_path / "run"
    summary = train_into(cfg, run_dir)
    data = load_device_data(cfg, torch.device("cpu"))
    sizes = {}
    for fmt in ("factored", "dense"):
        path = export_run(run_dir, fmt)
        sizes[fmt] = path.stat().st_size
        model = load_exported(path)
        accuracy = evaluate(model, data.eval_batches["test"](), precision).accuracy
        assert accuracy == pytest.approx(summary["selected"]["test_acc"])
    assert sizes["factored"] < sizes["dense"]


@pytest.mark.parametrize("data,message", [
    ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("imagenet", "ImageFolder layout"),
])
def test_missing_data_roots_say_how_to_get_the_data(tmp_path, monkeypatch, data, message):
    monkeypatch.setattr("dlrt.experiments.data.sources.FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    cfg = compose_cfg(f"data={data}", f"data.root={tmp_path / 'empty'}", small=False)
    if data == "imagenet":
        cfg.model.name = "resnet50"  # any model: the data fail first
    with pytest.raises(DataError, match=message):
        train_into(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_checkpoint_is_reported_not_trained_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFolderError, match="delete it to start this run afresh"):
        train_into(compose_cfg("epochs=1"), run_dir)
    assert (run_dir / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_export_of_a_folder_that_is_no_run(tmp_path):
    from dlrt.experiments.export import main

    assert main([str(tmp_path)]) == 2


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_decides_whether_subnormal_floats_survive(flush):
    before = torch.tensor([1e-39]).item() == 0  # the process-wide flag as it was
    try:
        configure_cpu(OmegaConf.create({"threads": None, "flush_denormal": flush}))
        tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
        assert (tiny.item() == 0) == flush
        assert ((torch.tensor([2e-38]) * 0.1).item() == 0) == flush  # arithmetic results too
    finally:
        torch.set_flush_denormal(before)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "run"
    train_into(compose_cfg("epochs=1", "data.n_train=256"), path)
    return path


def export_error(argv, capsys) -> str:
    from dlrt.experiments.export import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_export_makes_missing_folders_and_readable_files(finished_run, tmp_path):
    out = export_run(finished_run, "factored", tmp_path / "new" / "folder" / "model.safetensors")
    assert out.exists() and oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert load_exported(out)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_refuses_a_failed_run_unless_forced(finished_run, tmp_path, capsys):
    import shutil

    failed = tmp_path / "failed"
    shutil.copytree(finished_run, failed)
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed", "reason": "loss became nan"}))
    err = export_error([failed], capsys)
    assert "failed (loss became nan)" in err and "pass --force to export it" in err
    from dlrt.experiments.export import main

    assert main([str(failed), "--force"]) == 0


@pytest.mark.parametrize("broken,message", [("config.yaml", "config.yaml cannot be read"),
                                            ("best_model.pt", "best_model.pt cannot be read")])
def test_export_of_corrupt_files_is_one_line(finished_run, tmp_path, capsys, broken, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / broken).write_text("{{{ not: [yaml or a torch file")
    assert message in export_error([copy], capsys)


def test_export_rebuilds_an_image_folder_net_of_any_class_count(tmp_path):
    """A run's class count is in its summary: a net of 7 classes (not ImageNet's 1000) exports and reloads."""
    cfg = compose_cfg("epochs=1", "data.num_classes=7", "data.input_shape=[3,32,32]", "model=vgg16", "model.rank=4",
                      "data.n_train=16", "data.n_val=8", "data.n_test=8", "batch_size=8")
    run_dir = tmp_path / "run"
    train_into(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_classes"] == 7
    model = load_exported(export_run(run_dir, "dense"))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_a_run_resumed_where_its_fine_tuning_begins_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    from dlrt.experiments import train as trainer

    cfg = compose_cfg("model=fc", "model.width=32", "epochs=1", "finetune.epochs=2", "data.n_train=512", "optim.momentum=0.9",
                      "optim=sgd")
    train_into(cfg, tmp_path / "whole")
    real = trainer._train_and_evaluate

    def stop_before_fine_tuning(cfg, epoch, *args, **kwargs):
        if epoch == 1:
            raise trainer.Interrupted("SIGTERM received")
        return real(cfg, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "_train_and_evaluate", stop_before_fine_tuning)
    with pytest.raises(trainer.Interrupted):
        train_into(cfg, tmp_path / "split")
    monkeypatch.setattr(trainer, "_train_and_evaluate", real)
    train_into(cfg, tmp_path / "split")
    columns = ["phase", "train_loss", "val_loss", "test_acc", "ranks"]
    whole, split = (pd.read_csv(tmp_path / name / "epochs.csv")[columns] for name in ("whole", "split"))
    pd.testing.assert_frame_equal(split, whole)


def test_export_of_an_unfinished_run_needs_force(finished_run, tmp_path, capsys):
    import shutil

    from dlrt.experiments.export import main

    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "summary.json").unlink()
    assert "has not finished" in export_error([unfinished], capsys)
    assert main([str(unfinished), "--force"]) == 0
    assert load_exported(unfinished / "model-factored.safetensors")


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills while the second epoch's checkpoint is written: one line names the file and the cause, no
    temporary file is left, the first epoch's checkpoint is intact, and the same command later resumes from it."""
    import errno

    real_write = Path.write_bytes
    checkpoints = []

    def write_bytes(self, data):  # the file system's side: some bytes go in, then the disk is full
        if "checkpoint.pt" in self.name:
            checkpoints.append(self)
            if len(checkpoints) == 2:  # the second epoch's
                real_write(self, bytes(data)[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    args = [*QUICK, "epochs=3", "out_dir=runs"]
    code, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "checkpoint.pt (No space left on device): the previous one is kept" in errors[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not (run_dir / "summary.json").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 0

    monkeypatch.setattr(Path, "write_bytes", real_write)  # room again
    code, err = run_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0 and "resuming" in err, err
    assert list(pd.read_csv(run_dir / "epochs.csv")["epoch"]) == [1, 2, 3]


def test_out_dir_empty_is_refused_and_nothing_goes_to_the_root(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "out_dir="], tmp_path, monkeypatch, capsys)
    assert code == 2 and "out_dir is empty" in err and not list(Path("/").glob("lenet5-synthetic-*"))


def test_a_factorisation_that_fails_in_training_is_a_failed_run_in_one_line(tmp_path, monkeypatch, capsys):
    from dlrt import DLRTOptimizer

    def step(self, closure=None):
        closure()
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix "
                                       "contained non-finite values.")

    monkeypatch.setattr(DLRTOptimizer, "step", step)
    code, err = run_in_process([*QUICK, "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].endswith("the factors became non-finite; a smaller lr may train")
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "failed"


@pytest.mark.parametrize("where,message", [("fifo", "exists and is not a file"), ("folder", "exists and is not a file"),
                                           ("", "an empty path"), ("locked/model.safetensors", "cannot be written")])
def test_export_refuses_an_out_it_cannot_or_must_not_replace(finished_run, tmp_path, capsys, monkeypatch, where, message):
    """The file is written by a rename: over /dev/null (as root) that replaced the device with a file; a FIFO
    stands in for a device here."""
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked")
    out = str(tmp_path / where) if where else ""
    if not where:
        from dlrt.experiments.export import main

        with pytest.raises(SystemExit):
            main([str(finished_run), "--out", out])
        assert message in capsys.readouterr().err
        return
    assert message in export_error([finished_run, "--out", out], capsys)
    assert (tmp_path / "fifo").is_fifo() and (tmp_path / "folder").is_dir()
