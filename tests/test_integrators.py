"""The CPU's fast linear algebra of the step (projected QR, SVD from the Gram matrix) against the plain one."""

import pytest
import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer
from dlrt import integrators as ig
from dlrt import linalg
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


@pytest.mark.parametrize("spectrum", ["random", "decaying", "repeated"])
def test_gram_svd_matches_the_svd_on_the_triplets_it_vouches_for(spectrum):
    g = torch.Generator().manual_seed(0)
    k = 40
    sigma = {"random": torch.rand(k, generator=g) + 0.1, "decaying": 0.5 ** torch.arange(k, dtype=torch.float32),
             "repeated": torch.ones(k)}[spectrum]
    A = orthonormal(k, k, 1) @ torch.diag(sigma.sort(descending=True).values) @ orthonormal(k, k, 2).T
    P, s, Qh = linalg.gram_svd(A)
    P_ref, s_ref, _ = torch.linalg.svd(A)
    assert torch.allclose(s, s_ref, atol=1e-6 * s_ref[0])
    r = max(k for k in range(1, 41) if linalg.gram_svd_accurate(s, k))
    assert r < 40 if spectrum == "decaying" else r == 40
    P, Q = P[:, :r], Qh[:r].T
    assert torch.allclose(P.T @ P, torch.eye(r), atol=1e-5) and torch.allclose(Q.T @ Q, torch.eye(r), atol=1e-5)
    assert torch.linalg.norm(P @ torch.diag(s[:r]) @ Q.T - A) <= 1e-5 + torch.linalg.norm(s_ref[r:])


@pytest.mark.parametrize("decompose", [linalg.svd, linalg.gram_svd], ids=["svd", "gram_svd"])
def test_svds_on_host_give_each_cores_decomposition_and_restore_the_threads(decompose):
    cores = [torch.randn(k, k, generator=torch.Generator().manual_seed(k)) for k in (3, 7, 5)]
    threads = torch.get_num_threads()
    factors, sigmas = linalg.svds_on_host(cores, decompose)
    assert torch.get_num_threads() == threads
    for core, (P, sigma, Qh), host_sigma in zip(cores, factors, sigmas):
        expected = decompose(core)
        for got, want in zip((P, sigma, Qh), expected):
            assert torch.equal(got, want)
        assert torch.equal(host_sigma, sigma)


def test_gram_svd_of_a_singular_core_leaves_no_nan_and_is_not_vouched_for():
    A = torch.zeros(6, 6)
    A[0, 0] = 2.0
    P, s, Qh = linalg.gram_svd(A)
    assert torch.isfinite(Qh).all() and s.tolist() == [2.0, 0, 0, 0, 0, 0]
    assert linalg.gram_svd_accurate(s, 1) and not linalg.gram_svd_accurate(s, 2)


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
            W, W_ref = a.dense_matrix().detach(), b.dense_matrix().detach()
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
