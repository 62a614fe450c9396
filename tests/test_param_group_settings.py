"""Every setting of DLRTOptimizer is a param-group value, changed in place as torch's schedulers change lr: the
method (a fine-tuning phase needs no new optimizer) and the implementation switches (dlrt.placement)."""

import copy

import pytest
import torch

from dlrt import DLRTOptimizer, low_rank_layers

from helpers import batch_for, closure_step, plain_step, seeded, small_cnn, small_mlp


def set_method(opt, method: str) -> None:
    for group in opt.low_rank_groups:
        group["method"] = method


def test_a_fine_tuning_phase_switched_in_place_is_a_new_optimizer_of_that_method():
    """With stateless SGD (no momentum) the switch to `fixed` must step exactly as a fresh fixed-rank optimizer."""
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.1)
    for n in range(3):
        closure_step(model, opt, *batch_for(model, seed=n))
    fresh_model = copy.deepcopy(model)
    fresh = DLRTOptimizer(fresh_model, lr=0.5, tau=0.1, method="fixed")
    set_method(opt, "fixed")
    ranks = opt.ranks()
    for n in range(3, 6):
        closure_step(model, opt, *batch_for(model, seed=n))
        closure_step(fresh_model, fresh, *batch_for(model, seed=n))
    assert opt.ranks() == ranks == fresh.ranks()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters()))


def test_s_only_freezes_the_bases_and_a_switch_back_frees_them():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.1)
    set_method(opt, "s_only")
    layers = low_rank_layers(model)
    bases = [(layer.U.detach().clone(), layer.V.detach().clone()) for layer in layers]
    cores = [layer.S.detach().clone() for layer in layers]
    for n in range(3):
        plain_step(model, opt, *batch_for(model, seed=n))
    assert all(not layer.U.requires_grad and not layer.V.requires_grad for layer in layers)
    assert all(torch.equal(layer.U, U) and torch.equal(layer.V, V) for layer, (U, V) in zip(layers, bases))
    assert all(not torch.equal(layer.S, S) for layer, S in zip(layers, cores))
    set_method(opt, "adaptive")
    plain_step(model, opt, *batch_for(model))
    assert all(layer.U.requires_grad and layer.V.requires_grad for layer in layers)
    assert all(layer.U.shape != U.shape or not torch.allclose(layer.U, U) for layer, (U, _) in zip(layers, bases))


def test_groups_take_their_own_one_pass_methods():
    """One step from the same point: the s_only group's layer as an all-s_only optimizer steps it, the adaptive
    group's as an all-adaptive one does (a layer's step reads only its own gradients)."""
    model = seeded(small_mlp)
    runs = {}
    for name, groups in (("mixed", lambda m: [{"params": m[0], "method": "s_only"}, {"params": m[2:]}]),
                         ("s_only", lambda m: [{"params": m, "method": "s_only"}]),
                         ("adaptive", lambda m: [{"params": m}])):
        copy_ = copy.deepcopy(model)
        plain_step(copy_, DLRTOptimizer(groups(copy_), lr=0.5, tau=0.3), *batch_for(model))
        runs[name] = low_rank_layers(copy_)
    (first, second), s_only, adaptive = runs["mixed"], runs["s_only"], runs["adaptive"]
    for ours, theirs in ((first, s_only[0]), (second, adaptive[1])):
        for factor in ("U", "S", "V"):
            torch.testing.assert_close(getattr(ours, factor), getattr(theirs, factor), rtol=0, atol=1e-12)


def test_fixed_cannot_share_a_step_with_a_one_pass_method():
    model = seeded(small_mlp)
    opt = DLRTOptimizer([{"params": model[0], "method": "fixed"}, {"params": model[2:]}], lr=0.1)
    with pytest.raises(ValueError, match="give every low-rank group method='fixed', or none"):
        closure_step(model, opt, *batch_for(model))


def test_a_group_cannot_leave_vanilla():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, method="vanilla")
    plain_step(model, opt, *batch_for(model))
    set_method(opt, "adaptive")
    with pytest.raises(ValueError, match="cannot leave method='vanilla'"):
        plain_step(model, opt, *batch_for(model))


def test_a_switch_to_vanilla_absorbs_the_singular_values_and_keeps_the_weights():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1)
    weights = [layer.dense_weight().detach().clone() for layer in low_rank_layers(model)]
    set_method(opt, "vanilla")
    opt.zero_grad()
    for layer, weight in zip(low_rank_layers(model), weights):
        torch.testing.assert_close(layer.S, torch.eye(layer.rank, dtype=layer.S.dtype))
        torch.testing.assert_close(layer.dense_weight(), weight)


@pytest.mark.parametrize("key,value,message", [
    ("method", "sgd", "unknown method 'sgd'"),
    ("svd_on", "gpu", "unknown svd_on 'gpu'"),
    ("basis_every", 0, "basis_every must be an integer >= 1"),
])
def test_a_setting_changed_in_place_is_checked_at_the_next_step(key, value, message):
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        plain_step(model, opt, *batch_for(model))


def test_implementation_switches_agree_between_the_groups_of_a_step():
    model = seeded(small_mlp)
    opt = DLRTOptimizer([{"params": model[0], "svd_on": "host"}, {"params": model[2:]}], lr=0.1)
    with pytest.raises(ValueError, match="svd_on differs between the low-rank param groups"):
        plain_step(model, opt, *batch_for(model))


@pytest.mark.parametrize("method", ["adaptive", "vanilla"])
def test_a_deep_copy_of_model_and_optimizer_trains_as_the_original(method):
    """torch's Optimizer pickles only defaults, state and param_groups: the copy must keep its layers, its dense
    optimizer and what its groups are set up for (a copied vanilla group must not absorb its singular values again)."""
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=0.05, tau=0.1, method=method, momentum=0.9, basis_every=2 if method == "adaptive" else 1)
    plain_step(model, opt, *batch_for(model))
    twin, twin_opt = copy.deepcopy((model, opt))
    assert all(a is not b for a, b in zip(twin_opt.layers, opt.layers))
    for n in range(1, 4):
        plain_step(model, opt, *batch_for(model, seed=n))
        plain_step(twin, twin_opt, *batch_for(model, seed=n))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
