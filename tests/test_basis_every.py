"""Basis updates every k batches (basis_every=k): on every k-th batch of a group a basis step (truncate the core the
cycle trained, augment with this batch's gradient, S-step at the augmented bases; dlrt.basis_cycle), coefficient
steps (S and the dense parameters only) between; k = 1 is the paper's step."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.graphs import GraphedStep, ReplayGraphs

from helpers import batch_for, pin_ranks, plain_step, seeded, small_cnn, small_mlp


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kwargs,message", [
    (dict(basis_every=0), "basis_every must be an integer >= 1"),
    (dict(basis_every=2.5), "basis_every must be an integer >= 1"),
    (dict(basis_every=True), "basis_every must be an integer >= 1"),
    (dict(basis_every=2, method="fixed"), "applies to method='adaptive'"),
    (dict(basis_every=2, method="vanilla"), "applies to method='adaptive'"),
    (dict(basis_every=2, method="s_only"), "applies to method='adaptive'"),
    (dict(basis_every=2, method="parallel"), "applies to method='adaptive'"),
])
def test_basis_every_is_refused_where_it_makes_no_sense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLRTOptimizer(seeded(small_mlp), lr=0.1, **kwargs)
    opt = DLRTOptimizer(seeded(small_mlp), lr=0.1, method=kwargs.get("method", "adaptive"))
    with pytest.raises(ValueError, match=message):  # a group of its own is checked as the defaults are
        opt.add_param_group({"layers": seeded(small_mlp), "basis_every": kwargs["basis_every"]})


def test_a_cycle_is_one_basis_step_then_coefficient_steps():
    """Steps 0, 3, 6 are basis steps (U and V move, and the layers end augmented: their truncated rank plus as many
    new directions); the others move S and the dense parameters only, in a backward that neither computes G V and
    G^T U nor records x and dy."""
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.1, basis_every=3)
    layers = low_rank_layers(model)
    for n in range(7):
        x, y = batch_for(model, seed=n)
        before = [(layer.U.detach().clone(), layer.V.detach().clone(), layer.S.detach().clone()) for layer in layers]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        basis = n % 3 == 0
        for layer in layers:
            assert (layer.U.grad is not None) == basis and (layer.V.grad is not None) == basis
            assert (layer.step_inputs is not None and len(layer.step_inputs.records) > 0) == basis
            assert layer.S.grad is not None
        opt.step()
        for layer, (U, V, S) in zip(layers, before):
            if basis:
                assert U.shape != layer.U.shape or not torch.equal(U, layer.U)
                eye = torch.eye(layer.rank, dtype=layer.U.dtype)
                torch.testing.assert_close(layer.U.T @ layer.U, eye)
                torch.testing.assert_close(layer.V.T @ layer.V, eye)
            else:
                assert torch.equal(U, layer.U) and torch.equal(V, layer.V) and not torch.equal(S, layer.S)


def test_a_coefficient_step_is_the_plain_s_step_of_the_same_point():
    """After the basis step, S1 = S0 - lr U^T G V with G = dL/dW of a dense twin at the same weights; the dense
    parameters take a plain SGD step."""
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.3, tau=0.1, basis_every=4)
    plain_step(model, opt, *batch_for(model, seed=0))  # the basis step
    x, y = batch_for(model, seed=1)
    layers = low_rank_layers(model)
    weights = [layer.dense_weight().flatten(1).detach().clone().requires_grad_() for layer in layers]
    dense_model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        for index, low_rank, weight in zip((0, 2), layers, weights):
            dense_model[index].weight.copy_(weight)
            dense_model[index].bias.copy_(low_rank.bias)
        dense_model[4].load_state_dict(model[4].state_dict())
    F.cross_entropy(dense_model(x), y).backward()
    expected_S = [layer.S.detach() - 0.3 * layer.U.detach().T @ dense_layer.weight.grad @ layer.V.detach()
                  for layer, dense_layer in zip(layers, (dense_model[0], dense_model[2]))]
    expected_last = model[4].weight.detach() - 0.3 * dense_model[4].weight.grad
    ranks = opt.ranks()
    plain_step(model, opt, x, y)
    assert opt.ranks() == ranks
    for layer, S in zip(layers, expected_S):
        torch.testing.assert_close(layer.S.detach(), S)
    torch.testing.assert_close(model[4].weight.detach(), expected_last)


@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["linear", "conv"])
def test_basis_every_one_is_the_step_without_it_bit_for_bit(factory):
    model = seeded(factory)
    runs = []
    for kwargs in ({}, {"basis_every": 1}):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, lr=1.0, tau=0.1, optimizer="adam", **kwargs)
        for n in range(5):
            plain_step(copy_, opt, *batch_for(copy_, seed=n))
        runs.append(snapshot(copy_))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_run_resumed_in_the_middle_of_a_cycle_continues_bit_identically(optimizer):
    model = seeded(small_cnn)
    batches = [batch_for(model, seed=n) for n in range(9)]
    make = lambda m: DLRTOptimizer(m, lr=0.05 if optimizer == "sgd" else 1e-2, tau=0.1, optimizer=optimizer,
                                   momentum=0.9, basis_every=4)
    straight = copy.deepcopy(model)
    opt = make(straight)
    for n, batch in enumerate(batches):
        plain_step(straight, opt, *batch)
        if n == 5:  # two steps into the second cycle
            saved = copy.deepcopy((straight.state_dict(), opt.state_dict()))
    resumed = copy.deepcopy(model)
    opt = make(resumed)
    resumed.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    assert opt.param_groups[0]["basis_clock"] == 2
    for batch in batches[6:]:
        plain_step(resumed, opt, *batch)
    assert all(torch.equal(p, q) for p, q in zip(snapshot(straight), snapshot(resumed)))


@pytest.mark.parametrize("policy", ["project", "keep", "reset", "restart"])
def test_cycles_train_under_every_state_policy(policy):
    """The new directions of a basis step start with zero state columns, whatever the policy keeps (restart keeps
    a step count, a number, not columns)."""
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=1e-2, tau=0.1, optimizer="adam", state_policy=policy, basis_every=3)
    losses = [plain_step(model, opt, *batch_for(model, seed=n % 2)) for n in range(7)]
    opt.truncate()
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_groups_keep_their_own_cycles():
    model = seeded(small_mlp)
    opt = DLRTOptimizer([{"params": model[0], "basis_every": 2}, {"params": model[2:]}], lr=0.5, tau=0.1)
    first, second = low_rank_layers(model)
    for n in range(4):
        opt.zero_grad()
        F.cross_entropy(model(batch_for(model, seed=n)[0]), batch_for(model, seed=n)[1]).backward()
        assert (first.U.grad is not None) == (n % 2 == 0)
        assert second.U.grad is not None
        opt.step()


@pytest.mark.parametrize("optimizer,tau,grow_ranks_at", [("sgd", 0.2, None), ("adam", 0.2, None), ("sgd", 0.0, 4)])
def test_graphed_cycles_train_exactly_like_eager_ones(optimizer, tau, grow_ranks_at):
    """A coefficient step is one graph that holds the whole step: the replay stand-in refuses anything a CUDA graph
    cannot hold (a host read, an SVD), so capturing it proves there is none."""
    model = seeded(small_mlp)
    batches = [batch_for(model, seed=s) for s in [0, 1, 2, 3] * 4]
    kwargs = dict(lr=0.05 if optimizer == "sgd" else 1e-2, tau=tau, optimizer=optimizer, momentum=0.9,
                  basis_every=3, checked_shortcuts=False)
    runs = {}
    for graphed in (False, True):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, **kwargs)
        pin_ranks(opt, opt.ranks(), opt.ranks())
        step = GraphedStep(copy_, opt, F.cross_entropy, graphs=ReplayGraphs()) if graphed else None
        losses = []
        for n, (x, y) in enumerate(batches):
            if n == grow_ranks_at:
                pin_ranks(opt, opt.ranks(), [r + 1 for r in opt.ranks()])
            losses.append(step(x, y)[0].item() if graphed else plain_step(copy_, opt, x, y))
        runs[graphed] = (snapshot(copy_), losses, opt.ranks())
        if graphed:
            whole = [graphs for graphs in step._captured.values() if graphs.whole_step]
            assert len(whole) == 1 and step.counts["replayed"] >= (8 if grow_ranks_at is None else 4)
    torch.testing.assert_close(runs[True][1], runs[False][1])
    assert runs[True][2] == runs[False][2]
    for p, q in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["linear", "conv"])
def test_at_lr_zero_and_tau_zero_cycles_and_truncate_leave_every_weight_unchanged(factory):
    """Truncating the cycle's core and augmenting again rotate the bases only: a wrong factor in either moves W."""
    model = seeded(factory)
    opt = DLRTOptimizer(model, lr=0.0, tau=0.0, basis_every=3)
    start = weights(model)
    for n in range(7):
        plain_step(model, opt, *batch_for(model, seed=n))
    opt.truncate()
    for w0, w1 in zip(start, weights(model)):
        torch.testing.assert_close(w1, w0)


def test_the_basis_step_of_a_cycle_is_the_galerkin_step_at_the_augmented_bases():
    """At ϑ = 0 nothing is cut, so after the basis step W1 = W0 - lr Û Û^T G V̂ V̂^T for the new bases Û, V̂ and G the
    gradient of a dense twin at W0; its Ũ^T G Ṽ block comes from the recorded x and dy."""
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.3, tau=0.0, basis_every=4)
    for n in range(4):  # a whole cycle: the layers are augmented and their cores trained
        plain_step(model, opt, *batch_for(model, seed=n))
    x, y = batch_for(model, seed=9)
    start, grads = weights(model), dense_gradients(model, x, y)
    plain_step(model, opt, x, y)
    for layer, w0, G in zip(low_rank_layers(model), start, grads):
        U, V = layer.U.detach(), layer.V.detach()
        torch.testing.assert_close(layer.dense_weight().flatten(1).detach(), w0 - 0.3 * U @ U.T @ G @ V @ V.T)


def weights(model) -> list[torch.Tensor]:
    return [layer.dense_weight().flatten(1).detach().clone() for layer in low_rank_layers(model)]


def dense_gradients(model, x, y) -> list[torch.Tensor]:
    """dL/dW of each low-rank layer at its current weight, by plain autograd on W."""
    layers = low_rank_layers(model)
    dense = [layer.dense_weight().flatten(1).detach().clone().requires_grad_() for layer in layers]
    originals = [layer.forward for layer in layers]
    try:
        for layer, W in zip(layers, dense):
            layer.forward = lambda inp, W=W, layer=layer: F.linear(inp, W, layer.bias)
        F.cross_entropy(model(x), y).backward()
    finally:
        for layer, forward in zip(layers, originals):
            layer.forward = forward
    return [W.grad for W in dense]


def test_a_layer_by_layer_cycle_equals_the_batched_one():
    """The step one layer at a time (large factors on a CPU) gives the same cycles; its basis step reads the recorded
    x and dy after the truncation, so they must outlive the layer's first half (they did not: ResNet-50 failed)."""
    model = seeded(small_cnn)
    runs = []
    for layerwise in (False, True):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, lr=0.1, tau=0.1, basis_every=3, layerwise=layerwise)
        for n in range(7):
            plain_step(copy_, opt, *batch_for(copy_, seed=n))
        runs.append(snapshot(copy_))
    assert all(torch.equal(p, q) for p, q in zip(*runs))
