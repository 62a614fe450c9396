"""What people read and where things go: progress bars only on a terminal, no write into the checkout by default,
plots and headers that read right, and every CLI argument refused in one line when it cannot work."""

import fcntl
import os
import pty
import struct
import termios
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from dlrt.bench import cli as bench_cli

from helpers import QUICK, run_in_process, start_dlrt_run

ROOT = Path(__file__).resolve().parent.parent


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    code, err = run_in_process([*QUICK, "progress=true", "out_dir=runs"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "\r" not in err and "epoch   1/1 [train]" in err  # one line per epoch


def test_a_progress_bar_on_a_terminal(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    process = start_dlrt_run(*QUICK, "progress=true", f"out_dir={tmp_path}", cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=follower)
    os.close(follower)
    said = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the run ended and closed the terminal
            break
        if not chunk:
            break
        said += chunk
    assert process.wait(timeout=300) == 0, said.decode(errors="replace")
    assert b"%|" in said and b"it/s" in said  # the bar


def test_help_and_errors_point_to_the_list_of_keys(tmp_path, monkeypatch, capsys):
    from dlrt.experiments.cli import app_help

    assert "docs/runner.md" in app_help([]) and "README.md" not in app_help([])
    code, err = run_in_process(["nokey=1"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "docs/runner.md" in err and (ROOT / "docs" / "runner.md").exists()


def test_the_bench_writes_into_an_untracked_folder_unless_given_a_path():
    args = bench_cli.parse_args([])
    assert args.out == "bench_out" and "bench_out/" in (ROOT / ".gitignore").read_text().split()
    assert bench_cli.parse_args(["--out", "results/bench"]).out == "results/bench"


@pytest.mark.parametrize("args", [["--threads", "-1"], ["--threads", "0"], ["--steps", "0"], ["--steps", "-3"],
                                  ["--width", "0"], ["--max-seconds", "nan"], ["--max-seconds", "inf"],
                                  ["--wait-idle", "-1"], ["--warmup", "-1"], ["--out", ""], ["--out", "/dev/null"],
                                  ["--batches", "0"], ["--ts-batch", "0"], ["--rounds", "x"]])
def test_bench_arguments_that_cannot_work_are_one_line_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_cli.parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("dlrt-bench: error:")  # after the usage


def test_bench_output_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(bench_cli.Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    code = bench_cli.main(["--quick", "--device", "cpu", "--suite", "linalg", "--threads", "1",
                           "--out", str(tmp_path / "locked" / "new")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"dlrt-bench: error: [Errno 13] Permission denied"]


def test_the_bench_says_1_thread(tmp_path, capsys):
    assert bench_cli.main(["--quick", "--device", "cpu", "--suite", "linalg", "--threads", "1",
                           "--out", str(tmp_path)]) == 0
    assert " 1 thread," in capsys.readouterr().out


def test_a_one_epoch_rank_plot_has_integer_epochs(tmp_path):
    from dlrt.report import plots
    from dlrt.report.runs import Run

    epochs = pd.DataFrame({"epoch": [1], "rank_0": [9], "rank_1": [16], "rank_2": [28]})
    run = Run("r", {"method.name": "adaptive", "tau": 0.15, "seed": 0}, {}, epochs)
    figure = plots.rank_evolution([run])
    figure.canvas.draw()
    for ax in figure.axes:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(label.lstrip("−-").isdigit() for label in labels), labels


def test_a_table_header_says_with_what(tmp_path):
    from dlrt.experiments.protocols import TableProtocol
    from dlrt.report.markdown import provenance
    from dlrt.report.runs import Experiment, Run

    summary = {"status": "completed", "command": "dlrt-run experiment=lenet5_mnist seed=0", "device": "cpu",
               "torch": "2", "code_version": "abc", "finished": "2026-01-01T00:00:00+00:00"}
    run = Run("r", {"method.name": "adaptive", "tau": 0.15, "seed": 0}, summary, pd.DataFrame({"epoch": [1]}))
    protocol = TableProtocol("the paper's", {})
    lines = provenance(Experiment(tmp_path, [run], [], []), protocol, []).splitlines()
    said = lines.index(next(line for line in lines if line.endswith("with:")))
    assert lines[said + 1] == "```"  # the commands follow "with:"


def test_archived_fc_rows_are_not_joined_with_this_codes_runs():
    from dlrt.report import plots

    row = {"method": "adaptive", "width": 500, "paper_test_acc": float("nan"), "paper_eval_params": float("nan"),
           "n_seeds": 1, "test_acc_std": 0.1}
    frame = pd.DataFrame([{**row, "tau": 0.09, "eval_params_honest": 1000, "test_acc_mean": 98.0, "source": None},
                          {**row, "tau": 0.17, "eval_params_honest": 500, "test_acc_mean": 97.0, "source": "archive"}])
    figure = plots.fc_accuracy_vs_params({"fc500_mnist": frame})
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert "w = 500, ours" in labels and "w = 500, ours, archived rows" in labels
