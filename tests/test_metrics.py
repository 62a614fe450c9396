"""Parameter counts: the paper's LeNet5 table from its ranks, and the honest counts beside them."""

import pytest
from torch import nn

from dlrt import LowRankConv2d, LowRankLinear
from dlrt.metrics import (WeightShape, compression_rate, count_shapes, dense_reference, low_rank_layer_count,
                          parameter_report)

# LeNet5's three low-rank weight matrices (n x m) and its dense 10x500 output layer
LENET5 = [(20, 25), (50, 500), (500, 800)]
# PAPER.md §3: ranks of the low-rank layers, eval params, c.r. eval, train params, c.r. train
PAPER_ROWS = [
    ([10, 23, 62], 37445, 91.3, 532176, 38.2),
    ([10, 20, 48], 30278, 93.0, 412898, 52.0),
    ([9, 16, 37], 24542, 94.3, 316997, 63.2),
    ([9, 16, 28], 20033, 95.3, 251477, 70.8),
    ([8, 8, 15], 13091, 97.0, 135536, 84.3),
    ([4, 6, 8], 9398, 97.8, 80792, 90.6),
    ([2, 4, 4], 7250, 98.3, 47882, 94.4),
    ([2, 2, 3], 6647, 98.5, 35654, 95.9),
]


def lenet5_shapes(ranks):
    return [WeightShape(f"l{i}", n, m, r) for i, ((n, m), r) in enumerate(zip(LENET5, ranks))] + \
        [WeightShape("out", 10, 500, None)]


def test_dense_reference_is_the_papers():
    shapes = lenet5_shapes([1, 1, 1])
    assert dense_reference(shapes, "eval") == 430500
    assert dense_reference(shapes, "train") == 861000


@pytest.mark.parametrize("ranks,eval_params,cr_eval,train_params,cr_train", PAPER_ROWS)
def test_paper_convention_reproduces_every_lenet5_row(ranks, eval_params, cr_eval, train_params, cr_train):
    shapes = lenet5_shapes(ranks)
    assert count_shapes(shapes, "paper", "eval") == eval_params
    assert count_shapes(shapes, "paper", "train") == train_params
    assert compression_rate(eval_params, 430500) == pytest.approx(cr_eval, abs=0.05)
    assert compression_rate(train_params, 861000) == pytest.approx(cr_train, abs=0.05)


def test_honest_eval_count_at_tau_015():
    # U and V: 45*9 + 550*16 + 1300*28 + 5000 = 50605 (PAPER.md §4), plus diag S: 9 + 16 + 28 -> 50658
    shapes = lenet5_shapes([9, 16, 28])
    assert count_shapes(shapes, "honest", "eval") == 50658
    assert compression_rate(50658, 430500) == pytest.approx(88.2, abs=0.05)


def test_single_layer_formulas():
    assert low_rank_layer_count(500, 800, 28, "paper", "train") == 191408
    assert low_rank_layer_count(500, 800, 28, "honest", "eval") == 1300 * 28 + 28
    assert low_rank_layer_count(500, 800, 28, "honest", "train") == 3 * 1300 * 28 + 6 * 28 * 28
    with pytest.raises(ValueError, match="honest, paper"):
        low_rank_layer_count(5, 5, 1, "flattering")


def test_report_reads_a_real_model():
    model = nn.Sequential(
        LowRankConv2d(1, 20, 5, 9), nn.ReLU(), nn.MaxPool2d(2), LowRankConv2d(20, 50, 5, 16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), LowRankLinear(800, 500, 28), nn.ReLU(), nn.Linear(500, 10),
    )
    report = parameter_report(model)
    assert report["params_eval_paper"] == 20033
    assert report["params_train_paper"] == 251477
    assert report["params_eval_honest"] == 50658
    assert report["dense_params_eval"] == 430500
    assert report["cr_eval_paper"] == pytest.approx(95.35, abs=0.01)
