"""The authors' FC procedure (experiment=fc_mnist_authors) in the FC table: each ϑ's runs stop their adaptive phase
at the epoch of the authors' log, so its runs differ in their epochs, which must not keep them out of the column."""

import pytest

from dlrt.report.tables import main
from test_tables import FC500_DENSE, FC500_SHAPES, config, fc500_row, table, write_run


def test_authors_runs_of_different_adaptive_lengths_fill_their_rows(tmp_path):
    write_run(tmp_path, "fc_mnist", "ours-tau0.09", config("fc", "adaptive", 0.09, 0, 2, width=500, selection="final"),
              [(0.1, 97.0, [50, 50, 50, 50]), (0.2, 98.0, [40, 40, 40, 40])], shapes=FC500_SHAPES, dense_shapes=FC500_DENSE)
    for tau, epochs, acc in ((0.09, 2, 98.4), (0.05, 3, 98.6)):  # their 188 and 71 epochs, in small
        cfg = config("fc", "adaptive", tau, 0, epochs, width=500, selection="final")
        cfg["method"]["state_policy"] = "restart"
        write_run(tmp_path, "fc_mnist_authors", f"theirs-tau{tau}", cfg,
                  [(0.1, 97.0, [30, 30, 30, 30])] * (epochs - 1) + [(0.2, acc, [30, 30, 30, 30])],
                  shapes=FC500_SHAPES, dense_shapes=FC500_DENSE, command="dlrt-run experiment=fc_mnist_authors")
    main(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--experiments", "fc_mnist"])
    row = fc500_row(table(tmp_path / "out", "fc500_mnist"), 0.09)
    assert row["authors_test_acc_mean"] == pytest.approx(98.4) and row["authors_ranks"] == "[30,30,30,30]"


def test_the_authors_runs_come_last_with_the_epochs_of_their_logs():
    from dlrt.report.missing import planned_runs

    runs = planned_runs()
    theirs = [run for run in runs if run["experiment"] == "fc_mnist_authors"]
    assert runs[-len(theirs):] == theirs  # after every other table's runs
    assert [(run["tau"], run["epochs"]) for run in theirs] == [
        (0.17, 250), (0.15, 250), (0.13, 250), (0.11, 244), (0.09, 188), (0.07, 122), (0.05, 71), (0.03, 32)]
