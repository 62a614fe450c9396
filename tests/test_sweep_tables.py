"""dlrt-tables on a user's own sweep: one row per setting (seeds averaged), accuracy, ranks, parameter counts and
compression in both conventions, as CSV and Markdown, and a plot against ϑ."""

import pandas as pd
import pytest

from dlrt.report.tables import main as tables_main

from helpers import QUICK, dlrt_run


@pytest.fixture(scope="module")
def myruns(tmp_path_factory):
    """A user's sweep: two ϑ × two seeds, and a dense run beside it."""
    root = tmp_path_factory.mktemp("sweep")
    for args in (["-m", "tau=0.1,0.4", "seed=0,1"], ["method=dense"]):
        result = dlrt_run(*args, *QUICK, "out_dir=myruns", cwd=root)
        assert result.returncode == 0, result.stderr
    return root


def test_any_folder_of_runs_gives_a_table_and_a_plot(myruns, capsys):
    assert tables_main(["--runs", str(myruns / "myruns"), "--out", str(myruns / "out")]) == 0
    assert "nothing to tabulate" not in capsys.readouterr().err
    frame = pd.read_csv(myruns / "out" / "tables" / "sweep_myruns.csv")
    assert list(frame["method.name"]) == ["dense", "adaptive", "adaptive"]
    assert frame["tau"].isna()[0] and list(frame["tau"][1:]) == [0.1, 0.4]  # dense has no ϑ
    assert list(frame["n_seeds"]) == [1, 2, 2] and frame["test_acc_std"][1:].notna().all()
    for column in ("test_acc_mean", "ranks", "eval_params_honest", "eval_params_paper", "train_params_honest",
                   "cr_eval_honest", "cr_eval_paper", "cr_train_honest", "cr_train_paper"):
        assert frame[column].notna().all(), column
    markdown = (myruns / "out" / "tables" / "sweep_myruns.md").read_text()
    assert "| method | ϑ | runs | test acc (%) |" in markdown and " ± " in markdown
    assert "-m tau=0.1 seed=0,1" in markdown  # how to rerun it
    assert (myruns / "out" / "plots" / "sweep_myruns.png").stat().st_size > 0


def test_the_papers_experiment_folders_keep_their_own_tables(myruns, tmp_path):
    from dlrt.report.sweep import sweep_folders

    (myruns / "myruns" / "lenet5_mnist").mkdir(exist_ok=True)
    (myruns / "myruns" / "lenet5_mnist" / "x").mkdir(exist_ok=True)
    (myruns / "myruns" / "lenet5_mnist" / "x" / "config.yaml").write_text("tau: 0.1\n")
    folders = sweep_folders(myruns / "myruns", skip=("lenet5_mnist",))
    assert list(folders) == ["sweep_myruns"] and len(folders["sweep_myruns"]) == 5


@pytest.mark.parametrize("args,message", [(["--runs", ""], "--runs: is empty"), (["--out", ""], "--out: is empty"),
                                          (["--out", "/dev/null"], "--out /dev/null is a file, not a folder")])
def test_tables_arguments_that_cannot_work_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        tables_main(["--runs", str(tmp_path), *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_tables_that_cannot_be_written_are_one_line(myruns, tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert tables_main(["--runs", str(myruns / "myruns"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dlrt-tables: error: cannot write") and "No space left on device" in err[-1]
