"""The published code's procedures, reproduced as labelled options (results/ERRATA.md): the authors' initial factors,
their DLRT vs U V^T spectra and their U V^T baseline with frozen convs."""

import math

import pytest
import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, LowRankConv2d, LowRankLinear, convert, low_rank_layers
from dlrt.layers import sorted_half_normal
from dlrt.experiments.models import build_model


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, values, right=True) / len(x)
    return float((cdf(a) - cdf(b)).abs().max())


def reference_top_of_half_normal(samples: int, count: int, keep: int, generator) -> torch.Tensor:
    """The keep largest of count |N(0,1)| draws, drawn the plain way, `samples` times: (samples, keep)."""
    draws = torch.randn(samples, count, generator=generator, dtype=torch.float64).abs()
    return draws.sort(dim=1, descending=True).values[:, :keep]


@pytest.mark.parametrize("make,shape", [
    (lambda: LowRankLinear(800, 500, rank=25, init="authors"), (500, 800)),
    (lambda: LowRankConv2d(20, 50, 5, rank=25, init="authors"), (50, 500)),
], ids=["linear", "conv"])
def test_authors_init_has_orthonormal_factors_and_a_sorted_positive_core(make, shape):
    torch.manual_seed(0)
    layer = make().double()
    n, m = shape
    assert layer.U.shape == (n, 25) and layer.V.shape == (m, 25) and layer.S.shape == (25, 25)
    eye = torch.eye(25, dtype=torch.float64)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-6, rtol=0)
    sigma = layer.S.diagonal()
    assert torch.equal(layer.S, torch.diag(sigma))
    assert (sigma > 0).all() and torch.equal(sigma, sigma.sort(descending=True).values)


def test_authors_core_is_the_top_half_of_2r_half_normal_draws():
    """Over many layers, each position k of diag S has the law of the k-th largest of 2r draws of |N(0,1)|."""
    torch.manual_seed(1)
    rank, samples = 3, 1500
    ours = torch.stack([LowRankLinear(8, 8, rank, init="authors").S.diagonal().double() for _ in range(samples)])
    reference = reference_top_of_half_normal(samples, 2 * rank, rank, torch.Generator().manual_seed(2))
    for k in range(rank):  # at 1500 samples each, a KS distance above 0.06 has p < 0.01
        assert ks_distance(ours[:, k], reference[:, k]) < 0.06, k
    # and not the law of r draws or of 2r draws' bottom half (the test can fail)
    assert ks_distance(ours[:, 0], reference_top_of_half_normal(samples, rank, 1, torch.Generator().manual_seed(3))[:, 0]) > 0.1


def test_authors_random_bases_are_uniform():
    """Haar-distributed columns: the first coordinate of a random unit vector in R^n has E[u_1^2] = 1/n."""
    torch.manual_seed(3)
    first = torch.stack([LowRankLinear(6, 10, 2, init="authors").U[0, 0].detach() for _ in range(2000)]).double()
    assert abs(float(first.square().mean()) - 1 / 10) < 0.01
    assert abs(float(first.mean())) < 0.03  # no sign preference


def test_init_reaches_the_layers_through_convert_and_build_model():
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10, init="authors")
    assert [layer.rank for layer in low_rank_layers(model)] == [10, 25, 250]
    sigma = low_rank_layers(model)[2].S.diagonal().detach()
    assert 1.5 < float(sigma[0]) < 5 and float(sigma[-1]) > 0.3  # top half of 500 draws of |N(0,1)|
    svd_start = build_model("lenet5", (1, 28, 28), 10, init="svd")
    assert float(low_rank_layers(svd_start)[2].S[0, 0].detach()) < 1.2  # the truncated SVD of torch's default draw
    net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="from_weights=False"):
        convert(net, init="authors")
    converted, _ = convert(net, rank=3, from_weights=False, init="authors")
    assert torch.equal(converted[0].S, torch.diag(converted[0].S.diagonal()))


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown init 'xavier'.*svd, authors"):
        LowRankLinear(4, 4, 2, init="xavier")


@pytest.mark.parametrize("spectrum,decay", [("one", 1.0), ("pow2", 2.0), ("pow10", 10.0)])
def test_authors_spectra_are_sorted_half_normal_times_the_decay(spectrum, decay):
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10, rank=20, spectrum=spectrum, init="authors").double()
    for layer in low_rank_layers(model):
        sigma = layer.S.diagonal()
        s = sigma * decay ** torch.arange(20, dtype=sigma.dtype)  # undo d^-k
        assert (s > 0).all() and torch.equal(s, s.sort(descending=True).values), spectrum
        torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(20, dtype=sigma.dtype), atol=1e-5, rtol=0)
    svd_start = build_model("lenet5", (1, 28, 28), 10, rank=20, spectrum=spectrum, init="svd")
    torch.testing.assert_close(low_rank_layers(svd_start)[0].S.diagonal(), decay ** -torch.arange(20.0))


def test_sorted_half_normal_keeps_the_largest():
    torch.manual_seed(0)
    values = sorted_half_normal(10, 4, torch.zeros(()))
    assert values.shape == (4,) and torch.equal(values, values.sort(descending=True).values)


def authors_baseline(spectrum: str = "pow10"):
    from dlrt.experiments.runtime import make_model, make_optimizer
    from helpers import compose_config

    cfg = compose_config(["experiment=dlrt_vs_uv_authors", "method=vanilla_frozen_convs", f"model.spectrum={spectrum}"])
    torch.manual_seed(0)
    model = make_model(cfg, (1, 28, 28), 10)
    return model, make_optimizer(cfg, model, "vanilla_frozen_convs")


def test_authors_uv_baseline_trains_exactly_fc1_factors_biases_and_classifier():
    model, opt = authors_baseline()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved == {"0.bias", "3.bias", "7.U", "7.V", "7.bias", "9.weight", "9.bias"}


def test_authors_uv_baseline_keeps_the_convs_undecayed_and_decays_fc1():
    model, _ = authors_baseline("pow10")
    conv1, conv2, fc1 = low_rank_layers(model)
    for conv in (conv1, conv2):
        sigma = torch.linalg.svdvals(conv.dense_weight().flatten(1).detach().double())[:20]
        assert float(sigma[9] / sigma[0]) > 1e-2  # sorted |N(0,1)| draws, not 10^-9 at k = 9
        assert not any(p.requires_grad for p in (conv.U, conv.S, conv.V))
    sigma = torch.linalg.svdvals(fc1.dense_weight().flatten(1).detach().double())
    assert float(sigma[5] / sigma[0]) < 1e-3  # 10^-k
    assert fc1.U.requires_grad and fc1.V.requires_grad


def test_authors_baseline_needs_their_init_and_a_spectrum():
    from dlrt.experiments.validate import ConfigError, validate
    from helpers import compose_config

    with pytest.raises(ConfigError, match="model.init=authors"):
        validate(compose_config(["method=vanilla_frozen_convs", "model.spectrum=pow2", "data=synthetic"]))
    validate(compose_config(["experiment=dlrt_vs_uv_authors", "method=vanilla_frozen_convs", "model.spectrum=pow2"]))
    with pytest.raises(ConfigError, match="selection=final"):
        validate(compose_config(["data.split=train_test"]))


def test_train_test_split_has_no_validation_set_and_the_paper_splits_test_set():
    from dlrt.experiments.data.arrays import _split_official

    labels = torch.arange(70_000) % 10
    raw = {"train_x": torch.arange(60_000).view(-1, 1, 1).expand(-1, 28, 28).to(torch.uint8), "train_y": labels[:60_000],
           "test_x": torch.zeros(10_000, 28, 28, dtype=torch.uint8), "test_y": labels[60_000:]}
    ours, paper = _split_official(raw, "train_test", seed=3), _split_official(raw, "paper", seed=3)
    assert (len(ours.train), len(ours.val), len(ours.test)) == (60_000, 0, 10_000)
    assert torch.equal(ours.test.x, paper.test.x) and torch.equal(ours.test.y, paper.test.y)
    assert torch.equal(ours.train.y.sort().values, torch.cat([paper.train.y, paper.val.y]).sort().values)
    assert int((ours.test.y == 3).sum()) == 1000  # stratified
