"""What a torch user does to gradients between backward() and step() reaches the rank-adaptive step: the Ũ^T G Ṽ
block, formed from the inputs the backward recorded, follows a rescaling of the gradients (clip_grad_norm_, a
GradScaler's unscale_) exactly, and an edit it cannot follow is warned about once."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers

from helpers import batch_for, seeded, small_cnn, small_mlp


def backward(model, x, y, scale: float = 1.0):
    F.cross_entropy(model(x), y).mul(scale).backward()


def weights(model) -> list[torch.Tensor]:
    return [layer.dense_weight().flatten(1).detach().clone() for layer in low_rank_layers(model)]


def step_with(edit, factory=small_mlp, scale: float = 1.0, **kwargs):
    """One adaptive step after backward() of `scale` times the loss and `edit(model)` of the gradients."""
    model = seeded(factory)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.0, **kwargs)
    opt.zero_grad()
    backward(model, *batch_for(model), scale)
    edit(model)
    opt.step()
    return model


@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["linear", "conv"])
def test_unscaling_a_scaled_loss_gives_the_unscaled_step(factory):
    """As a GradScaler does it, by hand on the CPU: backward of 1024 x the loss, every gradient divided by 1024."""
    plain = step_with(lambda model: None, factory)
    unscaled = step_with(lambda model: [p.grad.div_(1024) for p in model.parameters() if p.grad is not None],
                         factory, scale=1024.0)
    for a, b in zip(weights(plain), weights(unscaled)):
        torch.testing.assert_close(a, b)


def test_clip_grad_norm_gives_the_step_of_the_clipped_gradients():
    """A loss scaled by 1e4 and clipped to norm 1 steps as the loss scaled by the clipping factor would: before, the
    recorded block kept the 1e4 and the weights moved by about 1000 times too much."""
    factors = {}

    def clip(model):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        factors["clip"] = 1.0 / (norm.item() + 1e-6)

    clipped = step_with(clip, scale=1e4)
    scaled = step_with(lambda model: None, scale=1e4 * factors["clip"])
    start = weights(seeded(small_mlp))
    for a, b, w0 in zip(weights(clipped), weights(scaled), start):
        torch.testing.assert_close(a, b)
        assert (a - w0).norm() < 10 * (b - w0).norm() + 1e-12  # moved like the clipped step, not 1e4 times more


def test_a_hook_that_does_more_than_rescale_is_warned_about_once():
    model = seeded(small_mlp)
    first = low_rank_layers(model)[0]
    first.S.register_hook(lambda grad: grad + torch.randn_like(grad))  # not a rescaling
    opt = DLRTOptimizer(model, lr=0.1, tau=0.1)
    with pytest.warns(RuntimeWarning, match="changed since the backward other than by rescaling"):
        for seed in range(2):
            opt.zero_grad()
            backward(model, *batch_for(model, seed=seed))
            opt.step()
    assert opt._warned_edits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        opt.zero_grad()
        backward(model, *batch_for(model, seed=3))
        opt.step()


def test_a_rescaling_hook_is_honoured_without_a_warning():
    model = seeded(small_mlp)
    reference = copy.deepcopy(model)
    for layer in low_rank_layers(model):
        for factor in (layer.U, layer.S, layer.V):
            factor.register_hook(lambda grad: grad * 0.5)
    for p in (model[4].weight, model[4].bias, model[0].bias, model[2].bias):
        p.register_hook(lambda grad: grad * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for net, lr in ((model, 0.2), (reference, 0.1)):  # half the gradient at twice the lr: the same SGD step
            opt = DLRTOptimizer(net, lr=lr, tau=0.0)
            opt.zero_grad()
            backward(net, *batch_for(net))
            opt.step()
    for a, b in zip(weights(model), weights(reference)):
        torch.testing.assert_close(a, b)
