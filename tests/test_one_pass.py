"""The one-pass rank-adaptive step equals the paper's three-pass step, written here slowly and plainly.

The reference follows PAPER.md §1 literally with plain autograd on dense weights: a K pass at
W = K V0^T, an L pass at W = U0 L^T, the augmented bases Û = orth([K1, U0]), V̂ = orth([L1, V0]) (in
the paper's order, so a different basis of the same span than dlrt's), S̃ = Û^T U0 S0 V0^T V̂, an S
pass at W = Û S V̂^T, then SVD truncation. Momentum buffers are carried as dlrt's default `project`
policy says: as the W-space matrices they stand for.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dlrt import DLRTOptimizer, low_rank_layers

from helpers import batch_for, seeded, small_cnn, small_mlp

LR, TAU, STEPS = 2.0, 0.05, 4  # large enough steps that ranks grow and truncation cuts


class ThreePassReference:
    """Slow rank-adaptive DLRT with SGD (+ heavy-ball momentum) on a dense twin of the model."""

    def __init__(self, low_rank_model, dense_twin, momentum):
        self.twin, self.momentum = dense_twin, momentum
        self.names = [name for name, m in low_rank_model.named_modules() if m in low_rank_layers(low_rank_model)]
        modules = dict(low_rank_model.named_modules())
        self.factors = {n: [modules[n].U.detach().clone(), modules[n].S.detach().clone(), modules[n].V.detach().clone()]
                        for n in self.names}
        self.shapes = {n: dict(dense_twin.named_modules())[n].weight.shape for n in self.names}
        low_rank_ids = {id(p) for n in self.names for p in (modules[n].U, modules[n].S, modules[n].V)}
        self.dense = {k: p.detach().clone() for k, p in low_rank_model.named_parameters() if id(p) not in low_rank_ids}
        self.buffers = {n: [torch.zeros_like(f) for f in self.factors[n]] for n in self.names}  # K, S, L
        self.dense_buffers = {k: torch.zeros_like(p) for k, p in self.dense.items()}

    def loss(self, weights, dense, x, y):
        params = {f"{n}.weight": w.reshape(self.shapes[n]) for n, w in weights.items()}
        return F.cross_entropy(functional_call(self.twin, {**dense, **params}, (x,)), y)

    def grads(self, weights_of, leaves, x, y):
        leaves = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        loss = self.loss({n: weights_of(n, leaves[n]) for n in self.names}, self.dense, x, y)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def kl_grads(self, x, y):
        """The K- and L-step gradients at W0: dL/dK at W = K V0^T and dL/dL at W = U0 L^T."""
        f = self.factors
        gK = self.grads(lambda n, K: K @ f[n][2].T, {n: f[n][0] @ f[n][1] for n in self.names}, x, y)
        gL = self.grads(lambda n, L: f[n][0] @ L.T, {n: f[n][2] @ f[n][1].T for n in self.names}, x, y)
        return gK, gL

    def dense_step(self, grads):
        for k, g in grads.items():
            self.dense_buffers[k].mul_(self.momentum).add_(g)
            self.dense[k] = self.dense[k] - LR * self.dense_buffers[k]

    def step(self, x, y, r_min=2):
        f = self.factors
        gK, gL = self.kl_grads(x, y)
        bases, cores = {}, {}
        for n in self.names:
            U0, S0, V0 = f[n]
            bK, bS, bL = self.buffers[n]
            bK.mul_(self.momentum).add_(gK[n])
            bL.mul_(self.momentum).add_(gL[n])
            K1, L1 = U0 @ S0 - LR * bK, V0 @ S0.T - LR * bL
            U_hat = torch.linalg.qr(torch.cat([K1, U0], 1))[0]
            V_hat = torch.linalg.qr(torch.cat([L1, V0], 1))[0]
            bases[n] = (U_hat, V_hat)
            cores[n] = U_hat.T @ U0 @ S0 @ V0.T @ V_hat
        # S pass at the augmented bases; the dense parameters get their gradients from this pass
        S_leaves = {n: c.clone().requires_grad_() for n, c in cores.items()}
        dense = {k: p.clone().requires_grad_() for k, p in self.dense.items()}
        loss = self.loss({n: bases[n][0] @ S_leaves[n] @ bases[n][1].T for n in self.names}, dense, x, y)
        grads = torch.autograd.grad(loss, list(S_leaves.values()) + list(dense.values()))
        gS, g_dense = dict(zip(S_leaves, grads)), dict(zip(dense, grads[len(S_leaves):]))
        for n in self.names:
            U_hat, V_hat = bases[n]
            U0, S0, V0 = f[n]
            bK, bS, bL = self.buffers[n]
            bS_aug = U_hat.T @ U0 @ bS @ V0.T @ V_hat
            bS_aug = self.momentum * bS_aug + gS[n]
            S1 = cores[n] - LR * bS_aug
            P, sigma, Qh = torch.linalg.svd(S1)
            r1 = len(sigma)
            for k in range(len(sigma), -1, -1):  # smallest k whose dropped tail is within tau
                if torch.linalg.norm(sigma[k:]) <= TAU * torch.linalg.norm(sigma):
                    r1 = k
            n_out, m_in = self.shapes[n][0], self.shapes[n][1:].numel()
            r1 = max(r_min, min(r1, min(n_out, m_in) // 2))
            U1, V1 = U_hat @ P[:, :r1], V_hat @ Qh[:r1].T
            self.buffers[n] = [bK @ (V0.T @ V1), P[:, :r1].T @ bS_aug @ Qh[:r1].T, bL @ (U0.T @ U1)]
            f[n] = [U1, torch.diag(sigma[:r1]), V1]
        self.dense_step(g_dense)

    def fixed_step(self, x, y):
        """Fixed-rank KLS: K and L passes at W0, U1 = orth(K1), V1 = orth(L1), S̃ = U1^T U0 S0 V0^T V1, then
        an S pass at W = U1 S V1^T, which also gives the dense parameters their gradients."""
        f = self.factors
        gK, gL = self.kl_grads(x, y)
        for n in self.names:
            U0, S0, V0 = f[n]
            bK, bS, bL = self.buffers[n]
            bK = self.momentum * bK + gK[n]
            bL = self.momentum * bL + gL[n]
            U1 = torch.linalg.qr(U0 @ S0 - LR * bK)[0]
            V1 = torch.linalg.qr(V0 @ S0.T - LR * bL)[0]
            self.buffers[n] = [bK @ (V0.T @ V1), (U0.T @ U1).T @ bS @ (V0.T @ V1), bL @ (U0.T @ U1)]
            f[n] = [U1, U1.T @ U0 @ S0 @ V0.T @ V1, V1]
        S_leaves = {n: f[n][1].clone().requires_grad_() for n in self.names}
        dense = {k: p.clone().requires_grad_() for k, p in self.dense.items()}
        loss = self.loss({n: f[n][0] @ S_leaves[n] @ f[n][2].T for n in self.names}, dense, x, y)
        grads = torch.autograd.grad(loss, list(S_leaves.values()) + list(dense.values()))
        for n, g in zip(self.names, grads):
            self.buffers[n][1] = self.momentum * self.buffers[n][1] + g
            f[n][1] = f[n][1] - LR * self.buffers[n][1]
        self.dense_step(dict(zip(dense, grads[len(S_leaves):])))

    def weights(self):
        return {n: U @ S @ V.T for n, (U, S, V) in self.factors.items()}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_one_pass_adaptive_equals_three_pass_reference(factory, momentum):
    model = seeded(factory)
    reference = ThreePassReference(model, seeded(lambda: factory(low_rank=False)), momentum)
    opt = DLRTOptimizer(model, lr=LR, tau=TAU, method="adaptive", momentum=momentum)
    modules = dict(model.named_modules())
    rank_history = [opt.ranks()]
    for step in range(STEPS):
        x, y = batch_for(model, seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        reference.step(x, y)
        rank_history.append(opt.ranks())
        for name, W_ref in reference.weights().items():
            layer = modules[name]
            assert layer.rank == reference.factors[name][1].shape[0]
            W = layer.dense_weight().flatten(1).detach()
            assert torch.linalg.norm(W - W_ref) <= 1e-6 * torch.linalg.norm(W_ref), (step, name)
        for key, p in reference.dense.items():
            ours = dict(model.named_parameters())[key].detach()
            assert torch.linalg.norm(ours - p) <= 1e-6 * torch.linalg.norm(p), (step, key)
    assert len({tuple(r) for r in rank_history}) > 1, "the test should see ranks change"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["mlp", "cnn"])
def test_fixed_rank_step_equals_the_plain_kls_step(factory, momentum):
    model = seeded(factory)
    reference = ThreePassReference(model, seeded(lambda: factory(low_rank=False)), momentum)
    opt = DLRTOptimizer(model, lr=LR, method="fixed", momentum=momentum)
    modules = dict(model.named_modules())
    ranks = opt.ranks()
    for step in range(STEPS):
        x, y = batch_for(model, seed=step)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        reference.fixed_step(x, y)
        assert opt.ranks() == ranks
        for name, W_ref in reference.weights().items():
            W = modules[name].dense_weight().flatten(1).detach()
            assert torch.linalg.norm(W - W_ref) <= 1e-6 * torch.linalg.norm(W_ref), (step, name)
        for key, p in reference.dense.items():
            ours = dict(model.named_parameters())[key].detach()
            assert torch.linalg.norm(ours - p) <= 1e-6 * torch.linalg.norm(p), (step, key)


def count_passes(model):
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    model.register_full_backward_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1))
    return counts


@pytest.mark.parametrize("method,passes", [("adaptive", 1), ("parallel", 1), ("fixed", 2), ("s_only", 1), ("vanilla", 1)])
def test_passes_per_batch(method, passes):
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=0.1, tau=0.1, method=method)
    counts = count_passes(model)
    x, y = batch_for(model)
    x.requires_grad_()  # so the full backward hook has an input gradient to report

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert counts == {"forward": 3 * passes, "backward": 3 * passes}
