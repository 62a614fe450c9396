"""rank_gap.py (results/diagnostics/fc_rank_gap): the FC ranks of ours, of the authors' procedure and of their logs
beside the paper's. Their logs come from a clone of CSMMLab/DLRT-Net (not in CI); these tests feed it text."""
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results" / "diagnostics" / "fc_rank_gap"))
import rank_gap  # noqa: E402

THEIR_LOG = """loss_train;acc_train;loss_val;acc_val;loss_test;acc_test;rank1;rank2;rank3;rank4
1.04;0.6375;0.99;0.6537;1.00;0.6552;24;25;24;25
0.50;0.8625;0.52;0.8414;0.52;0.8427;19;23;24;23
"""


def test_their_log_reads_as_our_epochs():
    frame = rank_gap.read_log(THEIR_LOG)
    assert list(frame["epoch"]) == [1, 2]
    assert frame["test_acc"].tolist() == pytest.approx([65.52, 84.27])
    assert rank_gap.ranks_of(rank_gap.end_of_adaptive(frame)) == [19, 23, 24, 23]


def test_gaps_over_30_percent_are_marked():
    assert rank_gap.ratios([13, 21, 31, 20], [20, 20, 24, 20]) == "**0.65** 1.05 1.29 1.00"
    assert rank_gap.ratios([10, 27], [20, 20]) == "**0.50** **1.35**"


def test_our_runs_are_read_at_the_end_of_the_adaptive_phase_not_after_the_fine_tuning():
    epochs = pd.DataFrame({"epoch": [1, 2, 3], "phase": ["train", "train", "finetune"], "test_acc": [90.0, 95.0, 98.0],
                           "rank_0": [30, 20, 20], "rank_1": [30, 21, 21], "rank_2": [30, 22, 22],
                           "rank_3": [30, 23, 23]})
    ranks, ratio, flat, acc_then, acc_final = rank_gap.source_cells(epochs, [20, 21, 22, 46], 0.1)
    assert ranks == "[20, 21, 22, 23] (epoch 2)"
    assert ratio == "1.00 1.00 1.00 **0.50**"
    assert flat == "0.45 0.46 0.47 0.48"  # ϑ√r
    assert (acc_then, acc_final) == ("95.00", "98.00")
    assert rank_gap.source_cells(None, [1, 1, 1, 1], 0.1) == ["–"] * 5


def test_without_a_clone_it_says_what_to_pass(tmp_path):
    with pytest.raises(SystemExit) as stop:
        rank_gap.main(["--repo", str(tmp_path), "--runs", str(tmp_path), "--out", str(tmp_path)])
    assert "clone github.com/CSMMLab/DLRT-Net" in str(stop.value)


def test_their_code_runs_are_told_apart_by_the_fix_and_read_only_when_finished(tmp_path):
    for name, finished in (("fc500-published-tf-tau0.17-seed0", True), ("fc500-published-tf-tau0.17-seed0-fix-rotation", True),
                           ("fc500-published-tf-tau0.13-seed0", False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "epochs.csv").write_text("epoch,test_acc,rank_0,rank_1,rank_2,rank_3\n1,90.0,5,6,7,8\n")
        if finished:
            (folder / "summary.json").write_text("{}")
    assert list(rank_gap.published_runs(tmp_path, fixed=False)) == [0.17]
    assert list(rank_gap.published_runs(tmp_path, fixed=True)) == [0.17]
    assert rank_gap.source_cells(rank_gap.published_runs(tmp_path, fixed=True)[0.17], [5, 6, 7, 8], 0.17)[4] == "–"


def test_the_spectrum_probe_records_what_the_truncation_decided_from():
    """spectrum_dlrt.recorded_cuts sees each step's augmented spectra and the ranks the layers then hold, and each
    rank is the rule's: the smallest r whose tail (σ_r+1, ...) is within ϑ‖σ‖."""
    import torch
    import torch.nn.functional as F

    import spectrum_dlrt
    from dlrt import DLRTOptimizer, LowRankLinear, integrators

    torch.manual_seed(0)
    model = torch.nn.Sequential(LowRankLinear(20, 32, rank=6), torch.nn.ReLU(), LowRankLinear(32, 24, rank=5))
    optimizer = DLRTOptimizer(model, lr=0.1, tau=0.2)
    x, y = torch.randn(32, 20), torch.randint(0, 24, (32,))
    rule = integrators.truncation_rank_tensor
    with spectrum_dlrt.recorded_cuts() as cut:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert integrators.truncation_rank_tensor is rule  # put back
    assert cut["ranks"] == [model[0].rank, model[2].rank]
    for sigma, r in zip(cut["sigmas"], cut["ranks"]):
        bound = 0.2 * sigma.norm()
        assert sigma[r:].norm() <= bound and (r <= 2 or sigma[r - 1:].norm() > bound)  # 2: the optimizer's r_min
        assert sigma.numel() > r  # the augmented core, before the cut
    line = spectrum_dlrt.cut_line(7, 0, torch.tensor([2.0, 1.0, 0.5]), 2, 0.1)
    assert line.startswith("step    7 layer 1: p   3  σ_1 2.000  σ_r 1.000  σ_r+1 0.5000  σ_r/σ_1 0.50")
    assert "σ_r/σ_rms 0.63" in line and line.endswith("-> rank 2")
