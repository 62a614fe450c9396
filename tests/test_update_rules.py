"""The update rules step several factors at once exactly as torch's own optimizers step each one."""

import pytest
import torch

from dlrt.update_rules import AdamRule, SGDRule


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
