"""The update rules step several factors at once exactly as torch's own optimizers step each one."""

import math

import pytest
import torch

from dlrt.update_rules import AdamRule, SGDRule, change_basis, lift_state


@pytest.mark.parametrize("rows_share_state", [False, True])
@pytest.mark.parametrize("make", [
    (lambda: AdamRule(betas=(0.8, 0.99), eps=1e-6), lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99), eps=1e-6)),
    (lambda: SGDRule(momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (lambda: SGDRule(), lambda p: torch.optim.SGD(p, lr=0.1)),
], ids=["adam", "momentum", "sgd"])
def test_directions_for_many_factors_step_like_torch_optimizers(make, rows_share_state):
    make_rule, make_torch_optimizer = make
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 3, generator=g), torch.randn(4, 4, generator=g), torch.randn(9, 2, generator=g)]
    ours = [x.clone() for x in start]
    theirs = [x.clone().requires_grad_() for x in start]
    rule, reference = make_rule(), make_torch_optimizer(theirs)
    states = [rule.init_state(x, rows_share_state=rows_share_state) for x in ours]
    for _ in range(5):
        grads = [torch.randn(x.shape, generator=g) for x in ours]
        for x, dx in zip(ours, rule.directions(states, grads)):
            x.sub_(0.1 * dx)
        for p, grad in zip(theirs, grads):
            p.grad = grad.clone()
        reference.step()
    for x, p in zip(ours, theirs):
        assert torch.allclose(x, p.detach(), atol=1e-6)


def test_no_factors_no_directions():
    assert AdamRule().directions([], []) == [] and SGDRule(0.9).directions([], []) == []


# ---------------------------------------------------------------------------------------------
# the "restart" policy: the published FC code's Adam (results/ERRATA.md, finding 4)
# ---------------------------------------------------------------------------------------------

BETAS = (0.9, 0.999)


def keras_correction(t: int) -> float:
    """Keras's Adam takes lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps) at its global step count t."""
    return math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)


def restart(state, rule, rows: int, cols: int, generator):
    """A basis change to rank (rows, cols) under the restart policy: random overlaps, as a DLRT step's."""
    old_rows, old_cols = state["exp_avg"].shape
    left = torch.linalg.qr(torch.randn(max(old_rows, rows), max(old_rows, rows), generator=generator))[0][:old_rows, :rows]
    right = torch.linalg.qr(torch.randn(max(old_cols, cols), max(old_cols, cols), generator=generator))[0][:old_cols, :cols]
    return change_basis(state, rule, "restart", left, right)


def test_the_first_step_after_a_restart_is_the_sign_step():
    """Once Keras's bias correction has died out (t = 3 n large), a restarted Adam moves every entry by
    lr (1 - beta1) / sqrt(1 - beta2), whatever the size of its gradient."""
    rule, g = AdamRule(betas=BETAS, eps=1e-8), torch.Generator().manual_seed(0)
    state = rule.init_state(torch.zeros(3, 3))
    batches = 5000  # t = 15000: beta2^t = 3e-7, so the correction is 1 to float precision
    for n in range(1, batches):
        rule.directions([state], [torch.randn(3, 3, generator=g)])
        state = change_basis(state, rule, "restart", torch.eye(3), torch.eye(3))
    state = restart(state, rule, 5, 4, g)  # and a rank change
    # sizes 0.1 ... 100 (eps = 1e-8 counts against sqrt(1 - beta2) |g| below some 1e-3)
    grad = torch.randn(5, 4, generator=g).sign() * torch.logspace(-1, 2, 20).reshape(5, 4)
    (direction,) = rule.directions([state], [grad])
    lr = 1e-3
    assert torch.allclose(lr * direction, lr * (1 - BETAS[0]) / math.sqrt(1 - BETAS[1]) * grad.sign(), rtol=1e-5, atol=0)
    assert math.isclose(lr * (1 - BETAS[0]) / math.sqrt(1 - BETAS[1]), 3.162e-3, rel_tol=1e-3)  # ERRATA's number


class PublishedAdam:
    """The published FC code's optimizer, written out plainly: one Keras Adam (tf 2.8's OptimizerV2, T@9bd6e9e
    tf_implementation/mnist_DLRA.py:115) whose slots are made, zero, for every variable it has not seen, and whose
    step count `iterations` grows by one per apply_gradients, whatever the variables."""

    def __init__(self, lr=1e-3, eps=1e-12):
        self.lr, self.eps, self.iterations, self.slots = lr, eps, 0, {}

    def apply_gradients(self, pairs):
        """pairs: (variable name, gradient); returns each variable's change."""
        self.iterations += 1
        t, (b1, b2) = self.iterations, BETAS
        changes = {}
        for name, grad in pairs:
            m, v = self.slots.get(name, (torch.zeros_like(grad), torch.zeros_like(grad)))
            m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad * grad
            self.slots[name] = (m, v)
            changes[name] = -self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + self.eps)
        return changes

    def batch(self, n, grad_K, grad_L, grad_S):
        """One batch of mnist_DLRA.py:162-231 for one layer: new variables K, L (dlranet.py:481, 499) and S (:520),
        the K and L gradients applied in turn to both (:199, 200; the other's gradient is zero, :183), then the S
        gradient (:231; K and L take a zero gradient again, but are made anew before they are read). Returns the
        changes of K and L when the QRs read them (after both applications) and the change of S."""
        K, L, S = f"K{n}", f"L{n}", f"S{n}"
        first = self.apply_gradients([(K, grad_K), (L, torch.zeros_like(grad_L))])
        second = self.apply_gradients([(K, torch.zeros_like(grad_K)), (L, grad_L)])
        third = self.apply_gradients([(S, grad_S), (K, torch.zeros_like(grad_K)), (L, torch.zeros_like(grad_L))])
        return first[K] + second[K], first[L] + second[L], third[S]


def test_restarted_adam_steps_as_the_published_code_does():
    """Against the published code's Adam over a few batches with rank changes: S's step is Keras's from the second
    batch on (in the first, Keras's count is 3 and ours 1); K's and L's have its directions (K moves twice, in its own
    application and again, on its moments, in L's: a larger step of the same signs), which is all the rank-adaptive
    step reads of them: their span."""
    lr, g = 1e-3, torch.Generator().manual_seed(1)
    rule, theirs = AdamRule(betas=BETAS, eps=1e-12), PublishedAdam(lr=lr, eps=1e-12)
    n_rows, m_rows, r = 8, 6, 3
    states = {"K": rule.init_state(torch.zeros(n_rows, r), rows_share_state=True),
              "L": rule.init_state(torch.zeros(m_rows, r), rows_share_state=True), "S": rule.init_state(torch.zeros(r, r))}
    for n, r_next in enumerate((3, 4, 2, 2, 3), start=1):
        grad_K, grad_L = torch.randn(n_rows, r, generator=g), torch.randn(m_rows, r, generator=g)
        grad_S = torch.randn(2 * r, 2 * r, generator=g)  # at the augmented bases
        dK, dL = rule.directions([states["K"], states["L"]], [grad_K, grad_L])
        states["S"] = lift_state(states["S"], 2 * r)
        (dS,) = rule.directions([states["S"]], [grad_S])
        change_K, change_L, change_S = theirs.batch(n, grad_K, grad_L, grad_S)
        for ours, published in ((dK, change_K), (dL, change_L)):
            cosine = torch.nn.functional.cosine_similarity(-ours.flatten(), published.flatten(), dim=0)
            assert cosine > 1 - 1e-6
        if n > 1:
            assert torch.allclose(-lr * dS, change_S, rtol=1e-5, atol=0)
        else:
            assert torch.allclose(-lr * dS * keras_correction(3) * (1 - BETAS[0]) / math.sqrt(1 - BETAS[1]), change_S,
                                  rtol=1e-5, atol=0)
        states["K"] = restart(states["K"], rule, n_rows, r_next, g)
        states["L"] = restart(states["L"], rule, m_rows, r_next, g)
        states["S"] = restart(states["S"], rule, r_next, r_next, g)
        r = r_next


def test_a_restart_zeroes_the_momentum_and_moves_a_restarted_state_under_any_policy():
    rule = SGDRule(momentum=0.9)
    state = {"momentum": torch.ones(4, 3)}
    moved = change_basis(state, rule, "restart", None, torch.eye(3)[:, :2])
    assert torch.equal(moved["momentum"], torch.zeros(4, 2))
    adam = AdamRule()
    restarted = change_basis(adam.init_state(torch.zeros(3, 3)), adam, "restart", torch.eye(3), torch.eye(3))
    for policy in ("project", "keep", "reset"):  # a policy changed after a restart: the masses stay one number
        moved = change_basis(restarted, adam, policy, torch.eye(3)[:, :2], torch.eye(3)[:, :2])
        assert moved["mass"].dim() == 0 and moved["exp_avg"].shape == (2, 2)
    assert lift_state(restarted, 5)["mass_sq"].dim() == 0
