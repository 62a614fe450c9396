"""dlrt-tables --missing: the runs of the protocols' sweeps that a runs folder does not hold finished."""

import json

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from dlrt.experiments.protocols import Sweep
from dlrt.report import missing
from dlrt.report.tables import main

SWEEP = Sweep("lenet5_mnist", {"seed": (0, 1, 2)}, {"tau": 0.3})


def write_folder(root, name, overrides, summary=None, drop=()):
    """A run folder as dlrt-run leaves it: its resolved config, and a summary once it has ended."""
    cfg = OmegaConf.to_container(compose_config(overrides), resolve=True, enum_to_str=True)
    for key in drop:  # a key an older code version did not write
        group, _, leaf = key.rpartition(".")
        (cfg[group] if group else cfg).pop(leaf)
    folder = root / "lenet5_mnist" / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """seed 0 finished (in a folder named by an older version), seed 1 interrupted, seed 2 never started."""
    monkeypatch.setattr(missing, "SWEEPS", (SWEEP,))
    base = ["experiment=lenet5_mnist", "tau=0.3"]
    write_folder(tmp_path, "lenet5-mnist-adaptive-tau0.3-seed0_old", base + ["seed=0", "out_dir=elsewhere"],
                 {"status": "completed"}, drop=("method.r_min",))
    write_folder(tmp_path, "lenet5-mnist-adaptive-tau0.3-seed1", base + ["seed=1"])
    return tmp_path


def test_lists_the_unfinished_and_the_missing_runs_in_order(runs, capsys):
    assert main(["--runs", str(runs), "--missing"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"dlrt-run experiment=lenet5_mnist tau=0.3 seed={seed} out_dir={runs} threads=1 progress=false" for seed in (1, 2)]


def test_runs_come_seed_by_seed_so_a_stopped_queue_leaves_rows_even():
    sweep = Sweep("dlrt_vs_uv", {"method": ("fixed", "vanilla"), "seed": (0, 1), "model.spectrum": ("one", "pow2")})
    runs = sweep.runs()
    assert [run["seed"] for run in runs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [(run["method"], run["model.spectrum"]) for run in runs[:4]] == [
        ("fixed", "one"), ("fixed", "pow2"), ("vanilla", "one"), ("vanilla", "pow2")]
    assert list(runs[0]) == ["experiment", "method", "seed", "model.spectrum"]  # the keys keep the grid's order


def test_a_finished_run_of_other_settings_does_not_count(runs, capsys):
    write_folder(runs, "lenet5-mnist-adaptive-tau0.3-seed2_lr=0.01", ["experiment=lenet5_mnist", "tau=0.3", "seed=2",
                                                                      "lr=0.01"], {"status": "completed"})
    main(["--runs", str(runs), "--missing"])
    assert [line.split()[3] for line in capsys.readouterr().out.splitlines()] == ["seed=1", "seed=2"]


def test_a_failed_run_is_named_not_listed(runs, capsys):
    write_folder(runs, "lenet5-mnist-adaptive-tau0.3-seed2", ["experiment=lenet5_mnist", "tau=0.3", "seed=2"],
                 {"status": "failed", "reason": "loss became nan in epoch 3"})
    main(["--runs", str(runs), "--missing"])
    out, err = capsys.readouterr()
    assert [line.split()[3] for line in out.splitlines()] == ["seed=1"]
    assert "failed before (loss became nan in epoch 3)" in err and "seed=2" in err


def test_overrides_and_seeds_make_a_quick_pass(runs, capsys):
    main(["--runs", str(runs), "--missing", "--seeds", "2", "--override", "epochs=1", "data.subset=500"])
    assert capsys.readouterr().out.splitlines() == [  # the finished seed 0 is of other settings (20 epochs)
        f"dlrt-run experiment=lenet5_mnist tau=0.3 seed={seed} epochs=1 data.subset=500 out_dir={runs} threads=1 "
        "progress=false" for seed in (0, 1)]


def test_an_override_without_a_value_is_refused(runs, capsys):
    with pytest.raises(SystemExit):
        main(["--runs", str(runs), "--missing", "--override", "epochs"])
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_a_key_an_older_folder_lacks_counts_as_its_default(tmp_path, monkeypatch, capsys):
    """A folder written before method.basis_every existed is a run at basis_every = 1: done for the sweep at the
    default, missing for basis_every = 10 (it failed this way: the k = 10 study counted as done)."""
    monkeypatch.setattr(missing, "SWEEPS", (Sweep("lenet5_mnist", {"method.basis_every": (1, 10)}, {"tau": 0.3}),))
    write_folder(tmp_path, "lenet5-mnist-adaptive-tau0.3-seed0", ["experiment=lenet5_mnist", "tau=0.3"],
                 {"status": "completed"}, drop=("method.basis_every",))
    main(["--runs", str(tmp_path), "--missing"])
    assert [line.split()[3] for line in capsys.readouterr().out.splitlines()] == ["method.basis_every=10"]
