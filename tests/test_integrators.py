"""The CPU's fast linear algebra of the step (projected QR, Cholesky-QR2 for large tall factors) against the plain one,
and the truncation rule that picks the new ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, LowRankLinear
from dlrt import linalg
from dlrt.integrators import truncation_rank_tensor
from dlrt.update_rules import AdamRule, change_basis

from helpers import batch_for, seeded, small_cnn, small_mlp


def orthonormal(n, r, seed=0, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=dtype))[0]


def projector(Q):
    return Q @ Q.T


@pytest.mark.parametrize("n,r,count,inside,outside", [
    (200, 20, 20, 1.0, 1.0),    # a generic step
    (200, 20, 20, 1.0, 1e-3),   # a step nearly inside span U0
    (60, 20, 7, 1.0, 1.0),      # fewer new directions than the rank
    (200, 20, 20, 1.0, 0.0),    # exactly inside span U0: falls back to the full QR
    (200, 20, 20, 0.0, 0.0),    # a zero step
])
def test_projected_new_directions_are_orthonormal_orthogonal_to_u0_and_span_the_step(n, r, count, inside, outside):
    U0 = orthonormal(n, r)
    g = torch.Generator().manual_seed(1)
    dK = inside * U0 @ torch.randn(r, r, generator=g) + outside * torch.randn(n, r, generator=g)
    for projected in (False, True):
        new = linalg.new_directions(U0, dK, count, projected=projected)
        assert new.shape == (n, count)
        assert torch.allclose(new.T @ new, torch.eye(count), atol=1e-5)
        assert (U0.T @ new).abs().max() < 1e-5
        basis = torch.cat([U0, new], 1)
        kept = dK[:, :count]
        assert torch.linalg.norm(kept - projector(basis) @ kept) <= 1e-5 * max(1.0, float(torch.linalg.norm(kept)))
    if outside > 0:  # a unique span: both ways give the same new directions, up to rounding
        full = linalg.new_directions(U0, dK, count, projected=False)
        fast = linalg.new_directions(U0, dK, count, projected=True)
        assert torch.allclose(projector(full), projector(fast), atol=1e-3 if outside < 1 else 1e-5)


@pytest.mark.parametrize("dK,widths", [
    (lambda U0: U0 @ torch.ones(5, 5), [5, 5]),  # nothing outside span U0: all 5 filled in
    (lambda U0: torch.cat([torch.randn(50, 2), U0[:, :3]], 1), [5, 3]),  # two directions outside, 3 filled in
    (lambda U0: torch.zeros(50, 5), [5, 5]),  # no step at all
    (lambda U0: torch.zeros(50, 5), [5, 5, 10]),  # ... where Householder's own completion is span U0: full QR
])
def test_projected_new_directions_complete_a_deficient_step(dK, widths, monkeypatch):
    U0 = torch.eye(50)[:, :5] if widths == [5, 5, 10] else orthonormal(50, 5)
    step = dK(U0)
    seen = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda A, *a, **k: seen.append(A.shape[1]) or qr(A, *a, **k))
    new = linalg.new_directions(U0, step, 5, projected=True)
    assert seen == widths
    assert torch.allclose(new.T @ new, torch.eye(5), atol=1e-5) and (U0.T @ new).abs().max() < 1e-5
    basis = torch.cat([U0, new], 1)
    assert torch.linalg.norm(step - projector(basis) @ step) <= 1e-5 * max(1.0, float(torch.linalg.norm(step)))
    assert torch.equal(new, linalg.new_directions(U0, step, 5, projected=True))  # deterministic


def conditioned(n: int, k: int, condition: float, seed: int = 0) -> torch.Tensor:
    """An n x k float32 matrix with singular values spread geometrically from 1 to 1/condition."""
    sigma = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return (orthonormal(n, k, seed).double() * sigma @ orthonormal(k, k, seed + 1).double().T).float()


@pytest.mark.parametrize("condition", [1.0, 1e2, 1e4, 1e8])
def test_tall_qr_is_orthonormal_and_spans_x_whichever_path_it_takes(condition):
    """At 2048 x 64 the size rule picks Cholesky-QR2; above κ ~ 3e3 its check sends it to Householder."""
    X = conditioned(2048, 64, condition)
    Q, R = linalg.tall_qr(X, checked=True)
    assert torch.linalg.matrix_norm(Q.T @ Q - torch.eye(64)) <= 1e-5
    assert torch.linalg.matrix_norm(Q @ R - X) <= 1e-5 * torch.linalg.matrix_norm(X)
    assert (linalg.cholesky_qr2(X) is None) == (condition > 1e3)  # the path it took


def test_tall_qr_of_a_rank_deficient_matrix_is_still_orthonormal():
    X = conditioned(2048, 64, 1.0)
    X[:, 10] = 0
    X[:, 20] = X[:, 3]
    Q, R = linalg.tall_qr(X, checked=True)  # Householder fills in directions of its own
    assert linalg.cholesky_qr2(X) is None
    assert torch.linalg.matrix_norm(Q.T @ Q - torch.eye(64)) <= 1e-5
    assert torch.linalg.matrix_norm(Q @ R - X) <= 1e-5 * torch.linalg.matrix_norm(X)


@pytest.mark.parametrize("method", ["adaptive", "fixed"])
def test_steps_with_cholesky_qr_equal_the_householder_steps(method):
    """A layer big enough for the size rule (2048 x 2048 at rank 64): the CPU's checked path (Cholesky-QR2 where
    it holds) and the plain path give the same weights to float32 precision."""
    runs = []
    for checked in (True, False):
        layer = seeded(lambda: LowRankLinear(2048, 2048, 64), dtype=torch.float32)
        opt = DLRTOptimizer(layer, lr=0.5, tau=0.1, method=method, checked_shortcuts=checked)
        x = torch.randn(96, 2048, generator=torch.Generator().manual_seed(1))

        def closure():
            opt.zero_grad()
            loss = layer(x).square().mean()
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        runs.append(layer.dense_weight().detach())
    assert torch.linalg.matrix_norm(runs[0] - runs[1]) <= 1e-4 * torch.linalg.matrix_norm(runs[1])


def test_svds_on_host_give_each_cores_decomposition_and_restore_the_threads():
    cores = [torch.randn(k, k, generator=torch.Generator().manual_seed(k)) for k in (3, 7, 5)]
    threads = torch.get_num_threads()
    factors, sigmas = linalg.svds_on_host(cores)
    assert torch.get_num_threads() == threads
    for core, (P, sigma, Qh), host_sigma in zip(cores, factors, sigmas):
        for got, want in zip((P, sigma, Qh), linalg.svd(core)):
            assert torch.equal(got, want)
        assert torch.equal(host_sigma, sigma)


# Not Adam: its first steps divide rounding noise by itself, so any two correct paths part at 1e-4.
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_float32_steps_on_the_cpu_path_match_the_plain_path(factory, momentum):
    def train(model, checked_shortcuts):
        opt = DLRTOptimizer(model, lr=0.5, tau=0.05, momentum=momentum, checked_shortcuts=checked_shortcuts)
        for step in range(4):
            x, y = batch_for(model, seed=step, dtype=torch.float32)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    fast = train(seeded(factory, dtype=torch.float32), checked_shortcuts=True)
    plain = train(seeded(factory, dtype=torch.float32), checked_shortcuts=False)  # what a GPU runs
    for a, b in zip(fast, plain):
        if hasattr(a, "U"):
            assert a.rank == b.rank
            W, W_ref = a.dense_weight().detach(), b.dense_weight().detach()
            assert torch.linalg.norm(W - W_ref) <= 1e-4 * torch.linalg.norm(W_ref)


def test_adam_masses_kept_as_one_row_move_like_full_ones():
    rule, g = AdamRule(), torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 5, generator=g) for _ in range(3)]
    shared, full = rule.init_state(grads[0], rows_share_state=True), rule.init_state(grads[0])
    assert shared["mass"].shape == (1, 5) and full["mass"].shape == (30, 5)
    for grad in grads:
        assert torch.allclose(rule.directions([shared], [grad])[0], rule.directions([full], [grad])[0])
    right = orthonormal(5, 5, 3)[:, :4]  # a rotation and a cut, as after a step to rank 4
    shared = change_basis(shared, rule, "project", None, right)
    full = change_basis(full, rule, "project", None, right)
    for key in full:
        assert torch.allclose(shared[key].expand_as(full[key]), full[key])


def test_batched_factorisations_equal_one_call_per_matrix():
    """Same-shaped QRs and SVDs go in one batched call (one launch on a GPU); the results are each matrix's own."""
    g = torch.Generator().manual_seed(0)
    bases = [torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))[0] for n in (12, 12, 9, 12)]
    directions = [torch.randn(U.shape[0], 3, generator=g, dtype=torch.float64) for U in bases]
    counts = [3, 3, 3, 2]  # the last: same shape, another count, so a group of its own
    batched = linalg.new_directions_of_many(bases, directions, counts)
    for U0, dK, count, found in zip(bases, directions, counts, batched):
        torch.testing.assert_close(found, linalg.new_directions(U0, dK, count))
    cores = [torch.randn(k, k, generator=g, dtype=torch.float64) for k in (6, 6, 4, 6)]
    for core, (P, sigma, Qh) in zip(cores, linalg.svds(cores)):
        torch.testing.assert_close(sigma, torch.linalg.svdvals(core))
        torch.testing.assert_close(P @ torch.diag(sigma) @ Qh, core)


# --- truncation: the new ranks from the singular values (moved from test_optim) --------------------

def ranks_for(sigmas, tau, relative=True, r_min=1, r_max=100):
    sigmas = [torch.tensor(s, dtype=torch.float64) for s in sigmas]
    n = len(sigmas)
    return truncation_rank_tensor(sigmas, tau, relative, torch.full((n,), r_min), torch.full((n,), r_max)).tolist()


def test_truncation_tail_includes_the_last_singular_value():
    # ‖σ‖ = 1: dropping only σ_4 = 0.3 leaves a tail 0.3 <= 0.35 -> rank 3; the published code,
    # which leaves σ_2r out of the tail, would cut one more.
    sigma = [0.8, 0.4, 0.332, 0.3]
    s = torch.tensor(sigma, dtype=torch.float64)
    sigma = (s / s.norm()).tolist()
    assert ranks_for([sigma], 0.35) == [3]
    tail_34 = torch.tensor(sigma[2:], dtype=torch.float64).norm().item()
    assert ranks_for([sigma], tail_34 + 1e-9) == [2]
    assert ranks_for([sigma], tail_34 - 1e-9) == [3]


def test_truncation_keeps_2r_when_no_cut_qualifies_and_for_tau_zero():
    assert ranks_for([[1.0, 1.0, 1.0, 1.0]], 0.1) == [4]
    assert ranks_for([[1.0, 0.5, 0.0, 0.0]], 0.0) == [4]


def test_truncation_is_clamped_and_vectorised_over_layers():
    sigmas = [[1.0, 1e-3, 1e-4, 1e-5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5]]
    assert ranks_for(sigmas, 0.01) == [1, 6, 2]
    assert ranks_for(sigmas, 0.01, r_min=2, r_max=5) == [2, 5, 2]
    per_layer = truncation_rank_tensor([torch.tensor(s) for s in sigmas], torch.tensor([0.01, 0.01, 0.9]),
                                       torch.tensor([True, True, False]), torch.ones(3), torch.full((3,), 100))
    assert per_layer.tolist() == [1, 6, 1]  # a tau and a relative flag per layer: σ = (1, 0.5) cut at 0.9 absolute


def test_absolute_tolerance():
    sigma = [[10.0, 1.0, 0.1, 0.01]]
    assert ranks_for(sigma, 0.2, relative=False) == [2]
    assert ranks_for(sigma, 1.1, relative=False) == [1]
    assert ranks_for(sigma, 0.2, relative=True) == [1]
