"""dlrt-tables on fake run folders written exactly as dlrt.experiments.train writes them."""

import json
import math
import statistics

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dlrt.metrics import compression_rate, dense_layer_count, low_rank_layer_count
from dlrt.report.markdown import command_lines
from dlrt.report.tables import main

LENET5_SHAPES = [(20, 25), (50, 500), (500, 800)]
LENET5_DENSE = [(10, 500)]
FC500_SHAPES = [(500, 784), (500, 500), (500, 500), (500, 500)]
FC500_DENSE = [(10, 500)]
COMMAND = "/repo/.venv/bin/dlrt-run -m experiment=lenet5_mnist seed=0,1 epochs=3"


def config(model: str, method: str, tau: float, seed: int, epochs: int, **extra) -> dict:
    """A resolved config as config.yaml holds it, with the protocol of `model`."""
    lenet = model == "lenet5"
    model_cfg = {"name": model, "rank": extra.pop("rank", None), "spectrum": extra.pop("spectrum", None)}
    if not lenet:
        model_cfg["width"] = extra.pop("width")
    return {
        "tau": tau, "seed": seed, "selection": extra.pop("selection", "min_val_loss"), "epochs": epochs,
        "batch_size": 128 if lenet else 256,
        "lr": extra.pop("lr", 0.05 if lenet else 0.001),
        "optim": {"name": "sgd" if lenet else "adam", "momentum": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "device": "auto", "threads": 1, "out_dir": "runs", "eval_batch_size": 2048, "progress": False,
        "finetune": {"method": "fixed", "epochs": extra.pop("finetune_epochs", 0)},
        "data": {"name": "mnist", "root": "data", "split": "paper" if lenet else "standard", "subset": None},
        "model": model_cfg,
        "method": {"name": method, "absolute_tau": False, "r_min": 2, "r_max": None, "state_policy": "project"},
    }


def epoch_row(epoch: int, val_loss: float, test_acc: float, ranks, shapes, dense_shapes, phase="train") -> dict:
    """One epochs.csv row, with parameter counts from dlrt.metrics for these ranks (None: a dense model)."""
    low_rank = [] if ranks is None else list(zip(shapes, ranks))
    dense = dense_shapes + (shapes if ranks is None else [])
    row = {"epoch": epoch, "phase": phase, "train_loss": val_loss, "train_acc": test_acc, "val_loss": val_loss,
           "val_acc": test_acc, "test_loss": val_loss, "test_acc": test_acc,
           "ranks": "" if ranks is None else " ".join(map(str, ranks)),
           **{f"rank_{i}": r for i, r in enumerate(ranks or [])}}
    for mode in ("eval", "train"):
        reference = sum(dense_layer_count(n, m, mode) for n, m in shapes + dense_shapes)
        row[f"dense_params_{mode}"] = reference
        for convention in ("honest", "paper"):
            count = sum(low_rank_layer_count(n, m, r, convention, mode) for (n, m), r in low_rank)
            count += sum(dense_layer_count(n, m, mode) for n, m in dense)
            row[f"params_{mode}_{convention}"] = count
            row[f"cr_{mode}_{convention}"] = compression_rate(count, reference)
    return {**row, "lr": 0.05, "epoch_time_s": 2.0, "eval_time_s": 0.5}


def write_run(root, experiment, name, cfg, epochs, *, status="completed", command=COMMAND, finished="2026-01-02T03:04:05+00:00",
              shapes=LENET5_SHAPES, dense_shapes=LENET5_DENSE):
    """A run folder; epochs: (val_loss, test_acc, ranks[, phase]) per epoch. status None: still running (no summary).
    The selected epoch is the config's selection: the final one, or that of minimum validation loss."""
    folder = root / experiment / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    rows = [epoch_row(i + 1, *e[:3], shapes, dense_shapes, *e[3:]) for i, e in enumerate(epochs)]
    pd.DataFrame(rows).to_csv(folder / "epochs.csv", index=False)
    if status == "completed":
        final = cfg.get("selection") == "final"
        best = rows[-1] if final else min(rows, key=lambda r: r["val_loss"])
        summary = {"status": "completed", "selected_epoch": best["epoch"],
                   "selection": "final epoch" if final else "minimum validation loss",
                   "selected": best, "final": rows[-1], "seconds_per_epoch": 2.0, "device": "NVIDIA H100",
                   "torch": "2.5.0", "code_version": "abc1234", "command": command, "finished": finished}
    elif status == "failed":
        summary = {"status": "failed", "reason": "loss became nan in epoch 2", "epochs_completed": 1,
                   "model": cfg["model"]["name"], "method": cfg["method"]["name"], "tau": cfg["tau"], "seed": cfg["seed"]}
    if status is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def lenet5_runs(root):
    """ϑ 0.15 and 0.3 (seeds 0, 1), dense (seeds 0, 1), a failed and an unfinished ϑ = 0.15 run.

    The selected epoch (min val loss) is the second one, whose test accuracy differs from the last's.
    """
    accs = {(0.15, 0): 97.0, (0.15, 1): 98.0, (0.3, 0): 96.0, (0.3, 1): 95.0}
    ranks = {(0.15, 0): [10, 20, 30], (0.15, 1): [9, 16, 28], (0.3, 0): [4, 6, 8], (0.3, 1): [5, 6, 9]}
    for (tau, seed), acc in accs.items():
        epochs = [(0.5, 90.0, [10, 25, 100]), (0.1, acc, ranks[tau, seed]), (0.2, 50.0, ranks[tau, seed])]
        write_run(root, "lenet5_mnist", f"lenet5-mnist-adaptive-tau{tau}-seed{seed}_epochs=3",
                  config("lenet5", "adaptive", tau, seed, 3), epochs, finished=f"2026-01-0{seed + 1}T00:00:00+00:00")
    for seed, acc in enumerate([98.5, 98.9]):
        write_run(root, "lenet5_mnist", f"lenet5-mnist-dense-tau0-seed{seed}_epochs=2", config("lenet5", "dense", 0, seed, 2),
                  [(0.2, 97.0, None), (0.1, acc, None)], command="dlrt-run -m experiment=lenet5_mnist method=dense tau=0 epochs=2")
    write_run(root, "lenet5_mnist", "lenet5-mnist-adaptive-tau0.15-seed2_epochs=3", config("lenet5", "adaptive", 0.15, 2, 3),
              [(0.5, 10.0, [10, 25, 100])], status="failed")
    write_run(root, "lenet5_mnist", "lenet5-mnist-adaptive-tau0.15-seed3_epochs=3", config("lenet5", "adaptive", 0.15, 3, 3),
              [(0.5, 10.0, [10, 25, 100])], status=None)


def fc_runs(root):
    """Width 500: ϑ = 0.09 at the FC protocol (the final epoch selected; 2 adaptive + 1 fine-tuning epochs), the same ϑ
    once more as runs made before that (selected at minimum validation loss), dense; a width-784 run still going."""
    fc500 = {"shapes": FC500_SHAPES, "dense_shapes": FC500_DENSE}
    epochs = [(0.3, 97.0, [60, 70, 70, 60]), (0.1, 98.0, [40, 50, 50, 45]), (0.2, 97.5, [30, 40, 40, 35]),
              (0.25, 97.7, [30, 40, 40, 35], "finetune")]
    for seed, shift in ((0, 0.0), (1, 0.2)):
        write_run(root, "fc_mnist", f"fc-mnist-adaptive+fixed1-tau0.09-seed{seed}_epochs=3,finetune.epochs=1,model.width=500",
                  config("fc", "adaptive", 0.09, seed, 3, width=500, finetune_epochs=1, selection="final"),
                  [(loss, acc + shift, *rest) for loss, acc, *rest in epochs], **fc500)
    write_run(root, "fc_mnist", "fc-mnist-adaptive+fixed1-tau0.09-seed0_epochs=3,finetune.epochs=1,model.width=500,old",
              config("fc", "adaptive", 0.09, 0, 3, width=500, finetune_epochs=1), epochs, **fc500)
    write_run(root, "fc_mnist", "fc-mnist-dense-tau0-seed0_epochs=2,model.width=500",
              config("fc", "dense", 0, 0, 2, width=500, selection="final"), [(0.3, 97.0, None), (0.2, 98.3, None)], **fc500)
    write_run(root, "fc_mnist", "fc-mnist-adaptive-tau0.05-seed0_model.width=784",  # still running, another width
              config("fc", "adaptive", 0.05, 0, 250, width=784, selection="final"), [(0.3, 97.0, [60, 70, 70, 60])],
              status=None)


def dlrt_vs_uv_runs(root):
    """Spectra one and pow10, DLRT and U V^T, seeds 0 and 1, three epochs."""
    for spectrum in ("one", "pow10"):
        for method, base in (("fixed", 90.0), ("vanilla", 80.0)):
            for seed in (0, 1):
                epochs = [(0.3 - 0.1 * e, base + e + seed, [20, 20, 20]) for e in range(3)]
                write_run(root, "dlrt_vs_uv", f"lenet5-mnist-{method}-tau0.0-seed{seed}_model.spectrum={spectrum}",
                          config("lenet5", method, 0.0, seed, 3, rank=20, spectrum=spectrum, lr=0.01), epochs)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Fake runs of all three experiments, tabulated once."""
    root = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("results")
    lenet5_runs(root)
    fc_runs(root)
    dlrt_vs_uv_runs(root)
    assert main(["--runs", str(root), "--out", str(out)]) == 0
    return out


def table(made, name) -> pd.DataFrame:
    return pd.read_csv(made / "tables" / f"{name}.csv", keep_default_na=False, na_values=[""])


def lenet5_row(frame, method, tau=None, init="svd"):
    rows = frame[(frame["method"] == method) & ((frame["tau"] == tau) if tau is not None else True)
                 & ((frame["init"].fillna("") == init) if method != "dense" else True)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_lenet5_rows_are_the_papers_plus_ours(made):
    frame = table(made, "lenet5_mnist")
    assert list(frame["method"]) == ["dense"] + ["adaptive"] * 16
    taus = [0.09, 0.11, 0.13, 0.15, 0.2, 0.3, 0.4, 0.45]
    assert list(frame["tau"].dropna()) == [tau for tau in taus for _ in range(2)]
    assert list(frame["init"].fillna("")) == [""] + ["authors", "svd"] * 8  # a run without model.init is svd's
    assert list(frame["n_seeds"]) == [2] + [0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0]


def test_lenet5_mean_std_of_the_selected_epoch_and_the_best_runs_ranks(made):
    row = lenet5_row(table(made, "lenet5_mnist"), "adaptive", 0.15)
    assert row["test_acc_mean"] == pytest.approx(97.5)
    assert row["test_acc_std"] == pytest.approx(statistics.stdev([97.0, 98.0]))
    assert row["best_seed"] == 1 and row["ranks"] == "[9,16,28,10]"
    assert row["eval_params_paper"] == 20033 and row["train_params_paper"] == 251477  # PAPER.md §4's checks
    assert row["eval_params_honest"] == 50605 + 9 + 16 + 28  # PAPER.md §4's (n+m) r, plus diag S
    assert row["cr_eval_honest"] == pytest.approx(88.2, abs=0.05)
    assert row["selected_epochs"] == "2 2" and row["seeds"] == "0 1"


def test_lenet5_paper_columns(made):
    frame = table(made, "lenet5_mnist")
    row = lenet5_row(frame, "adaptive", 0.15)
    assert (row["paper_test_acc"], row["paper_ranks"], row["paper_eval_params"]) == ("98.1 ± 0.33", "[9,16,28,10]", 20033)
    assert (row["paper_cr_eval"], row["paper_train_params"], row["paper_cr_train"]) == (95.3, 251477, 70.8)
    dense = lenet5_row(frame, "dense")
    assert dense["paper_test_acc"] == "98.8 ± 0.06" and dense["test_acc_mean"] == pytest.approx(98.7)
    assert dense["ranks"] == "full" and dense["eval_params_honest"] == 430500
    not_run = lenet5_row(frame, "adaptive", 0.45)
    assert not_run["n_seeds"] == 0 and math.isnan(not_run["test_acc_mean"]) and not_run["paper_eval_params"] == 6647


def test_failed_run_is_counted_and_named_but_not_averaged(made):
    row = lenet5_row(table(made, "lenet5_mnist"), "adaptive", 0.15)
    assert row["n_seeds"] == 2 and row["n_failed"] == 1
    md = (made / "tables" / "lenet5_mnist.md").read_text()
    assert "failed, not averaged: lenet5-mnist-adaptive-tau0.15-seed2_epochs=3 (loss became nan in epoch 2)" in md
    assert "| 0.15, svd | 2 (+1 failed) | 97.50 ± 0.71 | 98.1 ± 0.33 |" in md


def test_markdown_header_says_how_it_was_made(made):
    md = (made / "tables" / "lenet5_mnist.md").read_text()
    header = md.split("## The paper")[0]
    assert "\ndlrt-run -m experiment=lenet5_mnist seed=0,1 epochs=3\n" in header  # COMMAND, the program by its name
    assert "dlrt-run experiment=lenet5_mnist method=dense tau=0 epochs=2" in header  # runnable: no -m, no sweep
    assert "- seeds: 0, 1" in header and "epochs trained per run: dense 2, adaptive 3" in header
    assert "NOT the paper's protocol: adaptive runs have epochs = 3 in 4 run(s) (paper: 20)" in header
    assert "NOT the paper's protocol: dense runs have epochs = 2 in 2 run(s) (paper: 10)" in header
    assert "FEWER runs than the paper's 5 per row: dense (2), 0.15 (svd init) (2), 0.3 (svd init) (2)" in header
    assert "results/ERRATA.md" in header
    assert "NVIDIA H100" in header and "abc1234" in header
    assert "between 2026-01-01T00:00:00+00:00 and 2026-01-02T03:04:05+00:00" in header
    assert "still running (no summary.json): 1 run(s)" in header
    for column in ("acc (ours)", "acc (paper)", "c.r. eval honest (ours)", "c.r. eval paper conv. (ours)", "c.r. eval (paper)"):
        assert f"| {column} |" in md
    assert "## Notes" in md and "leaves the n_in × r factor V out" in md


def test_commands_that_differ_only_in_their_seed_are_merged():
    commands = [f"/x/.venv/bin/dlrt-run -m experiment=e method=fixed seed={s} out_dir=a" for s in (10, 2, 3)]
    commands += ["/x/.venv/bin/dlrt-run -m experiment=e method=fixed seed=0,1 out_dir=a",  # a sweep already
                 "/y/dlrt/cli.py -m experiment=e method=vanilla seed=2 'name=a b'",  # python -m dlrt.cli (old records)
                 "python -m dlrt.experiments experiment=e method=vanilla seed=3 'name=a b'",
                 "dlrt-run -m experiment=e method=vanilla"]
    assert command_lines(commands) == [  # each runnable: -m where it sweeps, and only there
        "dlrt-run experiment=e method=vanilla",
        "dlrt-run -m experiment=e method=fixed seed=0,1,2,3,10 out_dir=a",
        "python -m dlrt.experiments -m experiment=e method=vanilla seed=2,3 'name=a b'",
    ]


def fc500_row(frame, tau, selection="final"):
    rows = frame[(frame["tau"] == tau) & (frame["selection"] == selection)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_fc_table_per_width_with_the_papers_numbers(made):
    assert not (made / "tables" / "fc784_mnist.csv").exists()  # no run of that width
    frame = table(made, "fc500_mnist")
    assert list(frame["tau"].dropna()) == [0.03, 0.05, 0.07, 0.09, 0.09, 0.11, 0.13, 0.15, 0.17]
    row = fc500_row(frame, 0.09)
    assert row["paper_test_acc"] == 98.34 and row["paper_ranks"] == "[35,53,51,46]"
    assert row["paper_eval_params"] == 1284 * 35 + 1000 * (53 + 51 + 46) + 5000
    assert row["paper_cr_eval"] == pytest.approx(compression_rate(row["paper_eval_params"], 784 * 500 + 3 * 500 ** 2 + 5000))
    dense = frame[frame["method"] == "dense"].iloc[0]
    assert dense["paper_eval_params"] == dense["eval_params_honest"] == dense["eval_params_fc"] == 784 * 500 + 3 * 500 * 500 + 5000


def test_fc_rows_are_read_at_the_final_epoch_with_the_adaptive_phases_ranks(made):
    row = fc500_row(table(made, "fc500_mnist"), 0.09)
    assert row["n_seeds"] == 2 and row["test_acc_mean"] == pytest.approx(97.8)  # after the fine-tuning epoch
    assert row["best_seed"] == 1 and row["ranks"] == row["adaptive_end_ranks"] == "[30,40,40,35]"
    assert row["min_val_loss_test_acc_mean"] == pytest.approx(98.1) and row["min_val_loss_ranks"] == "[40,50,50,45]"
    assert row["min_val_loss_epochs"] == "2 2" and row["epochs"] == 4
    # the FC tables' convention (PAPER.md §4), from the ranks the row shows
    assert row["eval_params_fc"] == 1284 * 30 + 1000 * (40 + 40 + 35) + 5000
    train = lambda n_plus_m, r: 2 * n_plus_m * r + 4 * r * r
    assert row["train_params_fc"] == train(1284, 30) + 2 * train(1000, 40) + train(1000, 35) + 2 * 5000
    md = (made / "tables" / "fc500_mnist.md").read_text()
    assert "each run read at its final epoch" in md.split("## ")[0]  # the header says which epoch
    assert "finetune.epochs = 1 in 3 run(s) (paper: 100)" in md
    assert "still running" not in md  # the unfinished run is of width 784
    assert ("| 0.09 | 98.34 | 97.80 ± 0.14 | 98.10 ± 0.14 | [35,53,51,46] | [30,40,40,35] | 82.6 % | "
            f"{compression_rate(row['eval_params_fc'], 784 * 500 + 3 * 500 ** 2 + 5000):.1f} % | – | – |") in md
    assert "| 0.03 | 98.49 | not run | – |" in md and "290 s per epoch" not in md  # queued with the other rows


def test_only_fc784_at_003_is_not_run_for_its_cost(tmp_path):
    write_run(tmp_path, "fc_mnist", "fc-mnist-adaptive-tau0.09-seed0_model.width=784",
              config("fc", "adaptive", 0.09, 0, 2, width=784, selection="final"),
              [(0.1, 97.0, [50, 50, 50, 50]), (0.2, 98.0, [40, 40, 40, 40])],
              shapes=[(784, 784)] * 4, dense_shapes=[(10, 784)], command="dlrt-run experiment=fc_mnist")
    main(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--experiments", "fc_mnist"])
    md = (tmp_path / "out" / "tables" / "fc784_mnist.md").read_text()
    assert "| 0.03 | 98.61 | not run (cost: see the notes) |" in md and "290 s per epoch" in md


def test_fc_runs_selected_by_another_rule_are_a_row_of_their_own(made):
    old = fc500_row(table(made, "fc500_mnist"), 0.09, "min_val_loss")
    assert old["n_seeds"] == 1 and old["test_acc_mean"] == pytest.approx(98.0) and old["ranks"] == "[40,50,50,45]"
    md = (made / "tables" / "fc500_mnist.md").read_text()
    assert "| 0.09 (selected at min_val_loss) | 1 | 98.00 (1 run) |" in md
    assert "adaptive runs have selection = min_val_loss in 1 run(s) (paper: final)" in md


def test_fc_authors_procedure_beside_ours(tmp_path):
    for experiment, acc in (("fc_mnist", 98.0), ("fc_mnist_authors", 98.4)):
        write_run(tmp_path, experiment, "fc-mnist-adaptive-tau0.09-seed0_model.width=500",
                  config("fc", "adaptive", 0.09, 0, 2, width=500, selection="final"),
                  [(0.1, 97.0, [50, 50, 50, 50]), (0.2, acc, [30, 30, 30, 30] if acc > 98.1 else [40, 40, 40, 40])],
                  shapes=FC500_SHAPES, dense_shapes=FC500_DENSE, command=f"dlrt-run experiment={experiment}")
    main(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--experiments", "fc_mnist"])
    row = fc500_row(table(tmp_path / "out", "fc500_mnist"), 0.09)
    assert row["authors_test_acc_mean"] == pytest.approx(98.4) and row["authors_ranks"] == "[30,30,30,30]"
    md = (tmp_path / "out" / "tables" / "fc500_mnist.md").read_text()
    assert "| 98.40 (1 run) | [30,30,30,30] |" in md and "`dlrt-run experiment=fc_mnist_authors`" in md


def test_fc_authors_procedure_shows_where_ours_is_not_run(tmp_path):
    write_run(tmp_path, "fc_mnist_authors", "fc-mnist-adaptive-tau0.05-seed0_model.width=500",
              config("fc", "adaptive", 0.05, 0, 2, width=500, selection="final"),
              [(0.1, 97.0, [90, 90, 90, 90]), (0.2, 98.3, [80, 80, 80, 80])],
              shapes=FC500_SHAPES, dense_shapes=FC500_DENSE, command="dlrt-run experiment=fc_mnist_authors")
    write_run(tmp_path, "fc_mnist", "fc-mnist-adaptive-tau0.09-seed0_model.width=500",
              config("fc", "adaptive", 0.09, 0, 2, width=500, selection="final"),
              [(0.1, 97.0, [50, 50, 50, 50]), (0.2, 98.0, [40, 40, 40, 40])],
              shapes=FC500_SHAPES, dense_shapes=FC500_DENSE, command="dlrt-run experiment=fc_mnist")
    main(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--experiments", "fc_mnist"])
    md = (tmp_path / "out" / "tables" / "fc500_mnist.md").read_text()
    assert "| 0.05 | 98.56 | not run | – | [81,104,111,117] | – | 61.6 % | – | 98.30 (1 run) | [80,80,80,80] |" in md


def test_dlrt_vs_uv_accuracy_per_epoch(made):
    frame = table(made, "dlrt_vs_uv")
    assert list(zip(frame["spectrum"], frame["method"])) == [
        ("one", "fixed"), ("one", "vanilla"), ("pow2", "fixed"), ("pow2", "vanilla"), ("pow10", "fixed"), ("pow10", "vanilla")]
    row = frame[(frame["spectrum"] == "pow10") & (frame["method"] == "vanilla")].iloc[0]
    assert [row[f"epoch_{e}_mean"] for e in (1, 2, 3)] == pytest.approx([80.5, 81.5, 82.5])
    assert row["final_mean"] == pytest.approx(82.5) and row["final_std"] == pytest.approx(statistics.stdev([82, 83]))
    assert row["paper_final"] == pytest.approx(86.2, abs=0.05)  # the mean of the authors' 10 runs: 86.24
    assert frame[frame["spectrum"] == "pow2"]["n_seeds"].tolist() == [0, 0]
    md = (made / "tables" / "dlrt_vs_uv.md").read_text()
    assert "| 10^-k | U V^T | 2 | 82.50 ± 0.71 | 86.2 |" in md and "| 2^-k | DLRT | 0 | not run | 97.3 |" in md
    assert "FEWER runs than the paper's 10 per row" in md
    # what one run cost (3 epochs of 2.0 s in these records), and where the runs still planned are listed
    assert "(a run took 6 s of training here on average; `dlrt-tables --runs results/runs --missing` lists the runs " \
           "the tables' sweeps plan and lack)" in md
    assert "Seeds: this table's sweep (protocols.SWEEPS) runs 5 per curve; the curves run so far have 2." in md


def test_plots_are_png_files(made):
    for name in ("lenet5_rank_evolution", "lenet5_accuracy_compression", "fc_accuracy_vs_params", "dlrt_vs_uv"):
        assert (made / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiments_option_and_unfinished_note(tmp_path, capsys):
    lenet5_runs(tmp_path / "runs")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "tables").iterdir()) == ["lenet5_mnist.csv", "lenet5_mnist.md"]
    assert "lenet5-mnist-adaptive-tau0.15-seed3_epochs=3" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "tables").glob("*.tmp"))


def test_runs_of_different_settings_are_not_averaged_together(tmp_path):
    runs = tmp_path / "runs"
    lenet5_runs(runs)
    write_run(runs, "lenet5_mnist", "lenet5-mnist-adaptive-tau0.15-seed0_data.subset=5000,epochs=3",
              {**config("lenet5", "adaptive", 0.15, 0, 3), "data": {"name": "mnist", "root": "data", "split": "paper", "subset": 5000}},
              [(0.1, 50.0, [5, 5, 5])])
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist"])
    frame = table(tmp_path / "out", "lenet5_mnist")
    rows = frame[(frame["tau"] == 0.15) & (frame["init"] == "svd")]
    assert sorted(rows["settings"]) == ["data.subset=5000", "data.subset=None"]
    assert rows.set_index("settings").loc["data.subset=None", "test_acc_mean"] == pytest.approx(97.5)


def test_empty_runs_folder(tmp_path, capsys):
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to tabulate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_authors_init_runs_make_rows_of_their_own(tmp_path):
    runs = tmp_path / "runs"
    lenet5_runs(runs)
    authors = config("lenet5", "adaptive", 0.15, 0, 3)
    authors["model"]["init"] = "authors"
    write_run(runs, "lenet5_mnist", "lenet5-mnist-adaptive-tau0.15-seed0_epochs=3,model.init=authors", authors,
              [(0.1, 91.0, [2, 3, 4])])
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist"])
    frame = table(tmp_path / "out", "lenet5_mnist")
    assert lenet5_row(frame, "adaptive", 0.15, "authors")["test_acc_mean"] == pytest.approx(91.0)
    assert lenet5_row(frame, "adaptive", 0.15, "svd")["test_acc_mean"] == pytest.approx(97.5)
    md = (tmp_path / "out" / "tables" / "lenet5_mnist.md").read_text()
    assert "| 0.15 | 98.1 ± 0.33 | 91.00 (1 run) | 97.50 ± 0.71 | [9,16,28,10] | [2,3,4,10] | [9,16,28,10] |" in md


def test_archived_rows_fill_rows_without_runs_and_are_marked(tmp_path):
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    lenet5_runs(runs)
    archive.mkdir()
    (archive / "README.md").write_text("# Tables of an earlier commit\n")
    pd.DataFrame([{"method": "adaptive", "tau": 0.45, "settings": "", "n_seeds": 5, "test_acc_mean": 90.88,
                   "test_acc_std": 4.18, "ranks": "[2,3,3,10]"},
                  {"method": "adaptive", "tau": 0.15, "settings": "", "n_seeds": 5, "test_acc_mean": 11.0,
                   "test_acc_std": 0.1, "ranks": "[1,1,1,10]"}]).to_csv(archive / "lenet5_mnist.csv", index=False)
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist", "--archive", str(archive)])
    frame = table(tmp_path / "out", "lenet5_mnist")
    archived = lenet5_row(frame, "adaptive", 0.45, "svd")  # an archived table had no init: the svd init it had then
    assert archived["test_acc_mean"] == pytest.approx(90.88) and archived["source"].endswith("lenet5_mnist.csv")
    assert lenet5_row(frame, "adaptive", 0.15, "svd")["test_acc_mean"] == pytest.approx(97.5)  # runs win
    md = (tmp_path / "out" / "tables" / "lenet5_mnist.md").read_text()
    assert "90.88 ± 4.18 (a)" in md and "Tables of an earlier commit" in md
    assert "- rows marked (a) are archived runs, kept for comparison: 1 row(s) from" in md


def test_archived_fc_rows_are_min_val_loss_rows_and_fill_the_protocol_column_at_their_final_epoch(tmp_path):
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    fc_runs(runs)
    archive.mkdir()
    row = {"width": 500, "method": "adaptive", "n_seeds": 1, "n_failed": 0, "test_acc_mean": 98.08, "ranks": "[72,73,77,80]",
           "selected_epochs": "5", "final_test_acc_mean": 98.5, "final_ranks": "[47,46,48,58]"}
    pd.DataFrame([{**row, "tau": 0.11, "settings": "epochs=250, finetune.epochs=100"},
                  {**row, "tau": 0.13, "settings": "epochs=20, finetune.epochs=10"}]).to_csv(archive / "fc500_mnist.csv",
                                                                                          index=False)
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "fc_mnist", "--archive", str(archive)])
    archived = fc500_row(table(tmp_path / "out", "fc500_mnist"), 0.11, "min_val_loss")
    assert archived["min_val_loss_test_acc_mean"] == pytest.approx(98.08) and archived["adaptive_end_ranks"] == "[47,46,48,58]"
    md = (tmp_path / "out" / "tables" / "fc500_mnist.md").read_text()
    assert "| 0.11 | 98.11 | 98.50 (1 run) (a) | 98.08 (1 run) (a) | [27,40,37,38] | [47,46,48,58] |" in md
    assert "| 0.13 | 97.50 | not run |" in md  # an archived run of other epochs is not the protocol's
    assert ("| 0.11 [epochs=250, finetune.epochs=100] (selected at min_val_loss) | 1 | 98.08 (1 run) (a) | 98.08 (1 run) (a) "
            "| 98.11 |") in md


def test_unreadable_run_folders_are_named_and_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    lenet5_runs(runs)
    truncated = runs / "lenet5_mnist" / "lenet5-mnist-adaptive-tau0.3-seed0_epochs=3" / "summary.json"
    truncated.write_text('{"status": "compl')
    garbage = runs / "lenet5_mnist" / "lenet5-mnist-adaptive-tau0.3-seed1_epochs=3" / "epochs.csv"
    garbage.write_text("this,is\nnot,an epochs file\n")
    assert main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist"]) == 0
    err = capsys.readouterr().err
    assert "skipping an unreadable run folder, lenet5-mnist-adaptive-tau0.3-seed0_epochs=3" in err
    assert "lenet5-mnist-adaptive-tau0.3-seed1_epochs=3: " in err and "lacks the column" in err
    assert lenet5_row(table(tmp_path / "out", "lenet5_mnist"), "adaptive", 0.3)["n_seeds"] == 0
    md = (tmp_path / "out" / "tables" / "lenet5_mnist.md").read_text()
    assert "left out, unreadable: lenet5-mnist-adaptive-tau0.3-seed0_epochs=3" in md


def test_without_out_it_writes_beside_not_over_the_committed_results(tmp_path, monkeypatch):
    lenet5_runs(tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert main(["--runs", "runs", "--experiments", "lenet5_mnist"]) == 0
    assert (tmp_path / "tables_out" / "tables" / "lenet5_mnist.md").exists() and not (tmp_path / "results").exists()


def test_the_authors_setup_is_compared_with_the_papers_first_epochs(tmp_path):
    runs = tmp_path / "runs"
    for spectrum in ("one", "pow10"):
        for method in ("fixed", "vanilla_frozen_convs"):
            for seed in (0, 1):
                cfg = config("lenet5", method, 0.0, seed, 3, rank=20, spectrum=spectrum, lr=0.01)
                cfg["model"]["init"], cfg["data"]["split"], cfg["selection"] = "authors", "train_test", "final"
                accs = {"one": (81.0, 90.0), "pow10": (15.0, 50.0)}[spectrum]
                write_run(runs, "dlrt_vs_uv_authors", f"lenet5-mnist-{method}-tau0.0-seed{seed}_model.spectrum={spectrum}",
                          cfg, [(0.3, accs[0] + seed, [20] * 3), (0.2, accs[1] + seed, [20] * 3)])
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "dlrt_vs_uv_authors"])
    frame = table(tmp_path / "out", "dlrt_vs_uv_authors")
    assert list(frame["method"].unique()) == ["fixed", "vanilla_frozen_convs"]
    md = (tmp_path / "out" / "tables" / "dlrt_vs_uv_authors.md").read_text()
    # one DLRT epoch 1: 81.5 against the paper's 80.96 ± 6.95 (yes); 10^-k DLRT epoch 2: 50.5 against 77.82 ± 6.39 (no)
    assert "| 1 | DLRT | 2 | 90.50 ± 0.71 | 97.8 | 81.50 ± 0.71 | 80.96 ± 6.95 | yes |" in md
    assert "| 10^-k | DLRT | 2 | 50.50 ± 0.71 | 97.1 | 15.50 ± 0.71 | 39.06 ± 18.40 | yes | 50.50 ± 0.71 | 77.82 ± 6.39 | no |" in md
    assert "U V^T, convs frozen (the authors')" in md and "the authors' setup" in md


def test_two_folders_of_the_same_run_count_once(tmp_path):
    """The same run under two folder names (dlrt-run named ϑ = 0 "tau0" before its config was typed, "tau0.0" after):
    the later one counts, once."""
    runs = tmp_path / "runs"
    lenet5_runs(runs)
    write_run(runs, "lenet5_mnist", "lenet5-mnist-dense-tau0.0-seed0_epochs=2", config("lenet5", "dense", 0.0, 0, 2),
              [(0.2, 97.0, None), (0.1, 90.0, None)], finished="2026-02-01T00:00:00+00:00")
    main(["--runs", str(runs), "--out", str(tmp_path / "out"), "--experiments", "lenet5_mnist"])
    dense = lenet5_row(table(tmp_path / "out", "lenet5_mnist"), "dense")
    assert dense["n_seeds"] == 2 and dense["test_acc_mean"] == pytest.approx((90.0 + 98.9) / 2)


def test_a_key_older_runs_lack_holds_its_default_when_runs_are_grouped():
    """Configs written before method.basis_every existed hold its default (1): a k = 10 run beside them gets a label
    of its own, and the k = 1 runs none (before, only present values could differ: all three were averaged)."""
    from dlrt.report.runs import Run, settings_labels

    old = {"method.name": "adaptive", "tau": 0.15, "method.r_min": 2}
    runs = [Run("old0", old, {}, None), Run("old1", old, {}, None),
            Run("k10", {**old, "method.basis_every": 10}, {}, None), Run("k1", {**old, "method.basis_every": 1}, {}, None)]
    assert settings_labels(runs) == {"old0": "", "old1": "", "k10": "method.basis_every=10", "k1": ""}


def test_the_basis_every_study_has_a_table_of_its_own_beside_k_1(tmp_path):
    epochs = [(0.5, 97.0, [9, 16, 28]), (0.4, 98.0, [9, 16, 28])]
    for seed, k in ((0, 1), (1, 1), (0, 10), (1, 10)):
        cfg = config("lenet5", "adaptive", 0.15, seed, 2)
        cfg["model"]["init"] = "authors"
        if k > 1:
            cfg["method"]["basis_every"] = k
        write_run(tmp_path, "lenet5_mnist", f"lenet5-mnist-adaptive-tau0.15-seed{seed}_k{k}", cfg, epochs)
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    study = pd.read_csv(tmp_path / "out" / "tables" / "basis_every.csv")
    assert list(zip(study["basis_every"], study["n_seeds"])) == [(1, 2), (10, 2)]
    assert study["paper_test_acc"].tolist() == ["98.1 ± 0.33"] * 2
    lenet5 = pd.read_csv(tmp_path / "out" / "tables" / "lenet5_mnist.csv")
    assert lenet5[lenet5["tau"] == 0.15]["n_seeds"].max() == 2  # the k = 10 runs are not in the paper's table
