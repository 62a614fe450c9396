"""DLRTOptimizer: invariants of the step, truncation, training, state round trips, plain-torch parity."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlrt import METHODS, DLRTOptimizer, LowRankConv2d, LowRankLinear, low_rank_layers
from dlrt.functional import StepPlan
from dlrt.placement import HOST_SVD_MAX_SIZE, Placement
from dlrt.step_paths import takes_layer_by_layer

from helpers import batch_for, closure_step as train_step, seeded, small_cnn, small_mlp


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["linear", "conv"])
def test_lr_zero_and_tau_zero_leave_every_weight_unchanged(factory, method):
    """Catches the published code's wrong-factor rotation (PAPER.md §5), which moves W by >100 %."""
    model = seeded(factory, dtype=torch.float32)
    before = [layer.dense_weight().detach().clone() for layer in low_rank_layers(model)]
    initial_ranks = [layer.rank for layer in low_rank_layers(model)]
    opt = DLRTOptimizer(model, lr=0.0, tau=0.0, method=method, momentum=0.9)
    x, y = batch_for(model, dtype=torch.float32)
    for _ in range(3):
        train_step(model, opt, x, y)
    for layer, W0 in zip(low_rank_layers(model), before):
        assert torch.linalg.norm(layer.dense_weight() - W0) <= 1e-5 * torch.linalg.norm(W0)
    if method in ("adaptive", "parallel"):  # tau = 0 keeps all 2r directions, up to r_max
        assert opt.ranks() == [min(2**3 * r, layer.max_rank // 2) for r, layer in zip(initial_ranks, low_rank_layers(model))]


def test_tau_zero_doubles_rank_up_to_r_max():
    model = seeded(lambda: nn.Sequential(LowRankLinear(40, 30, 3), nn.ReLU(), LowRankLinear(30, 20, 4)))
    opt = DLRTOptimizer(model, lr=0.1, tau=0.0)
    x, y = torch.randn(8, 40, dtype=torch.float64), torch.randint(0, 20, (8,))
    train_step(model, opt, x, y)
    assert opt.ranks() == [6, 8]
    train_step(model, opt, x, y)
    assert opt.ranks() == [12, 10]  # 30x40 -> r_max 15; 20x30 -> r_max 10


# --- rank bounds in training -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["adaptive", "parallel"])
def test_ranks_stay_within_bounds_in_training(method):
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=1.0, tau=0.05, method=method, r_min=2, r_max=3)
    for step in range(5):
        train_step(model, opt, *batch_for(model, seed=step))
        assert all(2 <= r <= 3 for r in opt.ranks())
    for layer in low_rank_layers(model):
        eye = torch.eye(layer.rank, dtype=torch.float64)
        torch.testing.assert_close(layer.U.T @ layer.U, eye)
        torch.testing.assert_close(layer.V.T @ layer.V, eye)


# --- training ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,optimizer,lr,tau,steps", [
    ("adaptive", "sgd", 1.0, 0.02, 150),
    ("parallel", "sgd", 1.0, 0.02, 150),
    ("adaptive", "adam", 0.05, 0.1, 300),  # Adam moves every core entry by ~lr: it needs a larger tau
])
def test_training_recovers_a_planted_low_rank_teacher(method, optimizer, lr, tau, steps):
    """Regression onto a rank-3 teacher from rank 10: the loss falls and the rank goes to 3."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64) / 4
    x = torch.randn(512, 40, generator=g, dtype=torch.float64)
    y = x @ teacher.T
    model = seeded(lambda: LowRankLinear(40, 30, 10, bias=False))
    opt = DLRTOptimizer(model, lr=lr, tau=tau, method=method, optimizer=optimizer, r_min=1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-2 * losses[0]
    assert opt.ranks() == [3]


def test_classifier_loss_goes_down_with_momentum_and_adam():
    for optimizer, lr in [("sgd", 0.2), ("adam", 0.01)]:
        model = seeded(small_cnn)
        opt = DLRTOptimizer(model, lr=lr, tau=0.1, optimizer=optimizer, momentum=0.9)
        x, y = batch_for(model, n=64)
        losses = [train_step(model, opt, x, y) for _ in range(40)]
        assert losses[-1] < 0.5 * losses[0], optimizer


# --- plain-torch parity and state -----------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_model_without_low_rank_layers_trains_like_plain_torch(optimizer):
    ours, theirs = seeded(lambda: small_mlp(low_rank=False)), seeded(lambda: small_mlp(low_rank=False))
    opt = DLRTOptimizer(ours, lr=0.05, optimizer=optimizer, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, fused=True) if optimizer == "sgd" else \
        torch.optim.Adam(theirs.parameters(), lr=0.05, fused=True)
    for step in range(3):
        x, y = batch_for(ours, seed=step)
        train_step(ours, opt, x, y)
        ref.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_state_dict_round_trip_then_bit_identical_step(method, optimizer):
    model = seeded(small_cnn)
    kwargs = dict(lr=0.5 if optimizer == "sgd" else 0.02, tau=0.05, method=method, optimizer=optimizer, momentum=0.9)
    opt = DLRTOptimizer(model, **kwargs)
    for step in range(3):
        train_step(model, opt, *batch_for(model, seed=step))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    restored = seeded(small_cnn, seed=123)  # other init, other ranks until loaded
    restored.load_state_dict(saved_model)
    restored_opt = DLRTOptimizer(restored, **kwargs)
    restored_opt.load_state_dict(saved_opt)
    assert restored_opt.ranks() == opt.ranks()

    x, y = batch_for(model, seed=99)
    train_step(model, opt, x, y)
    train_step(restored, restored_opt, x, y)
    assert restored_opt.ranks() == opt.ranks()
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["adaptive", "parallel"])
def test_svds_on_the_host_give_the_steps_of_svds_on_the_device(method):
    """svd_on='host' (one copy of all cores, LAPACK, one copy back) against the default, in float64, where
    both take the plain SVD: the same ranks and factors, step after step, while the ranks change."""
    runs = []
    for svd_on in ("device", "host"):
        model = seeded(small_cnn).double()
        opt = DLRTOptimizer(model, lr=0.5, tau=0.02, method=method, momentum=0.9, svd_on=svd_on)
        ranks = [opt.ranks()]
        for step in range(4):
            x, y = batch_for(model, seed=step)
            train_step(model, opt, x.double(), y)
            ranks.append(opt.ranks())
        runs.append((model, ranks))
    (device_model, device_ranks), (host_model, host_ranks) = runs
    assert host_ranks == device_ranks and len({tuple(r) for r in device_ranks}) > 1
    for a, b in zip(device_model.parameters(), host_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_layer_by_layer_step_is_the_batched_step_bit_for_bit(optimizer):
    """layerwise=True frees each layer's augmented bases and SVD before the next layer's are made; the factors,
    ranks and states must be those of the batched step exactly, while the ranks change."""
    runs = []
    for layerwise in (False, True):
        model = seeded(small_cnn)
        lr, tau = (0.5, 0.05) if optimizer == "sgd" else (0.05, 0.1)
        opt = DLRTOptimizer(model, lr=lr, tau=tau, optimizer=optimizer, momentum=0.9, layerwise=layerwise)
        assert takes_layer_by_layer(opt.low_rank_groups, opt.placement()) is layerwise
        ranks = [opt.ranks()]
        for step in range(4):
            x, y = batch_for(model, seed=step)
            train_step(model, opt, x, y)
            ranks.append(opt.ranks())
        runs.append((model, opt, ranks))
    (batched, batched_opt, batched_ranks), (layered, layered_opt, layered_ranks) = runs
    assert layered_ranks == batched_ranks and len({tuple(r) for r in batched_ranks}) > 1
    for a, b in zip(batched.parameters(), layered.parameters()):
        assert torch.equal(a, b)
    assert all(layer.U.grad is None for layer in layered_opt.layers)  # freed as each layer's step read them
    for a, b in zip(batched_opt.state_dict()["state"].values(), layered_opt.state_dict()["state"].values()):
        for part in a:
            assert all(torch.equal(a[part][key], b[part][key]) for key in a[part])


def test_a_layer_by_layer_step_takes_the_layers_with_the_smallest_factors_first(monkeypatch):
    """The largest layer's temporaries are made last, when the others' records and gradients are freed."""
    import dlrt.functional as functional

    model = seeded(lambda: nn.Sequential(LowRankLinear(20, 64, 8), nn.ReLU(), LowRankLinear(64, 8, 2), nn.ReLU(),
                                         LowRankLinear(8, 32, 4), nn.ReLU(), nn.Linear(32, 4)))  # 672, 144, 160 numbers
    opt = DLRTOptimizer(model, lr=0.1, layerwise=True)
    order, decide_ranks = [], functional.decide_ranks

    def recording_decide_ranks(plan, *args):
        order.extend(opt.layers.index(step.layer) for step in plan.steps)
        return decide_ranks(plan, *args)

    monkeypatch.setattr(functional, "decide_ranks", recording_decide_ranks)
    x, y = batch_for(model)
    train_step(model, opt, x, y)
    assert order == [1, 2, 0]


def test_layerwise_by_default_only_for_large_factors_of_a_rank_changing_cpu_step():
    def layer_by_layer(opt):
        return takes_layer_by_layer(opt.low_rank_groups, opt.placement())

    assert not layer_by_layer(DLRTOptimizer(seeded(small_mlp), lr=0.1))
    assert layer_by_layer(DLRTOptimizer(nn.Sequential(LowRankLinear(2048, 2048, rank=640)), lr=0.1))
    assert not layer_by_layer(DLRTOptimizer(nn.Sequential(LowRankLinear(2048, 2048, rank=640)), lr=0.1,
                                            method="s_only"))


def test_svd_on_auto_takes_the_host_for_small_cores_of_a_gpu_step_only():
    def cores(is_cuda, *sizes):
        return [SimpleNamespace(is_cuda=is_cuda, shape=(k, k)) for k in sizes]

    opt = DLRTOptimizer(seeded(small_mlp), lr=0.1)
    auto = opt.placement()
    assert auto.svd_on == "auto" and all(group["svd_on"] == "auto" for group in opt.low_rank_groups)
    assert auto.svds_on_host(cores(True, 18, HOST_SVD_MAX_SIZE))
    assert not auto.svds_on_host(cores(True, 18, HOST_SVD_MAX_SIZE + 2))  # one large core: all on the GPU
    assert not auto.svds_on_host(cores(False, 18, 56))  # a CPU step is on the host already
    for group in opt.low_rank_groups:  # a switch is a param-group value, changed in place
        group["svd_on"] = "host"
    assert opt.placement().svds_on_host(cores(True, 18, 4 * HOST_SVD_MAX_SIZE))
    assert not Placement(svd_on="device").svds_on_host(cores(True, 18))


@pytest.mark.parametrize("policy", ["project", "keep", "reset"])
def test_state_policies_give_states_of_the_new_rank(policy):
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=2.0, tau=0.05, momentum=0.9, state_policy=policy)
    for step in range(3):
        train_step(model, opt, *batch_for(model, seed=step))
        for layer in low_rank_layers(model):
            state = opt.state[layer]
            assert state["K"]["momentum"].shape == layer.U.shape
            assert state["L"]["momentum"].shape == layer.V.shape
            assert state["S"]["momentum"].shape == layer.S.shape


def test_project_policy_carries_momentum_as_a_w_space_matrix():
    """With lr 0 the bases only gain directions; a projected buffer keeps standing for the same W-space matrix."""
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.0, momentum=0.9)
    train_step(model, opt, *batch_for(model))
    layer = low_rank_layers(model)[0]
    state = opt.state[layer]
    before = layer.U @ state["S"]["momentum"] @ layer.V.T
    opt.param_groups[0]["lr"] = 0.0
    x, y = batch_for(model, seed=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad_S_in_w_space = layer.U @ layer.S.grad @ layer.V.T
    opt.step()
    after = layer.U @ state["S"]["momentum"] @ layer.V.T
    # the new buffer is 0.9 * old + the gradient's projection onto the new (larger) bases
    projected = layer.U @ layer.U.T @ (0.9 * before + grad_S_in_w_space) @ layer.V @ layer.V.T
    torch.testing.assert_close(after, projected)


def test_dense_optimizer_can_be_chosen_and_schedulers_drive_both():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, dense_optimizer=lambda params: torch.optim.Adam(params, lr=0.1))
    assert isinstance(opt.dense_optimizer, torch.optim.Adam)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(model, opt, *batch_for(model))
    scheduler.step()
    assert opt.lr == pytest.approx(0.05)
    assert opt.dense_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tau=1.0), r"tau .* \[0, 1\)"),
    (dict(tau=-0.1), r"tau .* \[0, 1\)"),
    (dict(method="magic"), "adaptive, parallel, fixed"),
    (dict(optimizer="rmsprop"), "sgd, adam"),
    (dict(state_policy="forget"), "project, keep, reset"),
    (dict(lr=-1.0), "lr must be"),
    (dict(r_min=5, r_max=3), "r_max must be None or an integer >= r_min = 5"),
    (dict(r_min=0), "r_min must be an integer >= 1"),
    (dict(momentum=-1.0), r"momentum must be a number in \[0, 1\)"),
    (dict(optimizer="adam", betas=(2.0, 0.0)), r"betas must be two numbers in \[0, 1\)"),
    (dict(svd_on="gpu"), "auto, device, host"),
    (dict(lr=float("inf")), "lr must be a finite number >= 0, got inf"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
    (dict(lr=True), "lr must be a finite number >= 0, got True"),
    (dict(tau=float("inf"), absolute_tau=True), "tau must be a finite number"),
    (dict(tau=float("nan")), "tau must be a finite number"),
    (dict(momentum=float("inf")), r"momentum must be a number in \[0, 1\), got inf"),
    (dict(optimizer="adam", betas=(float("nan"), 0.999)), r"betas must be two numbers in \[0, 1\)"),
    (dict(optimizer="adam", betas=0.9), r"betas must be two numbers in \[0, 1\), got 0.9"),
    (dict(optimizer="adam", eps=float("inf")), "eps must be a finite number > 0, got inf"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(lr=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        DLRTOptimizer(seeded(small_mlp), **args)


def test_fixed_method_without_closure_says_what_to_do():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, method="fixed")
    F.cross_entropy(model(batch_for(model)[0]), batch_for(model)[1]).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_fixed_method_second_pass_takes_only_the_s_gradients_and_unfreezes_after():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, method="fixed")
    x, y = batch_for(model)
    seen = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append([(layer.U.grad is None, layer.V.grad is None, layer.S.grad is None) for layer in opt.layers])
        return loss

    opt.step(closure)
    assert seen == [[(False, False, False)] * 2, [(True, True, False)] * 2]  # first pass, second pass
    assert all(p.requires_grad for layer in opt.layers for p in (layer.U, layer.S, layer.V))


def test_fixed_method_unfreezes_the_factors_when_the_second_pass_fails():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, method="fixed")
    x, y = batch_for(model)
    calls = []

    def failing_closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(failing_closure)
    assert all(p.requires_grad for layer in opt.layers for p in (layer.U, layer.S, layer.V))


@pytest.mark.parametrize("make", [lambda: LowRankConv2d(1, 20, 5, rank=20), lambda: LowRankLinear(6, 4, rank=4)],
                         ids=["conv", "linear"])
@pytest.mark.parametrize("method", ["adaptive", "parallel"])
def test_a_layer_at_full_rank_steps_without_new_directions(make, method):
    torch.manual_seed(0)
    layer = make()
    opt = DLRTOptimizer(layer, lr=0.1, tau=0.0, method=method, r_max=layer.max_rank)
    x = torch.randn(8, 1, 12, 12) if isinstance(layer, LowRankConv2d) else torch.randn(8, 6)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert layer.rank == layer.max_rank and torch.isfinite(layer.dense_weight().flatten(1)).all()


def test_wrong_first_arguments_and_ranks_are_explained():
    model = seeded(small_mlp)
    with pytest.raises(TypeError, match=r"not its parameters.*DLRTOptimizer\(model, lr=...\)"):
        DLRTOptimizer(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rank 2.5 is not possible for a 4x4 weight: choose an integer"):
        LowRankLinear(4, 4, rank=2.5)


def test_per_group_hyperparameters_are_honoured():
    """Two groups with their own ϑ: the truncation of each layer reads its group's."""
    model = seeded(small_mlp)
    first, second = low_rank_layers(model)
    opt = DLRTOptimizer([{"params": first, "tau": 0.0}, {"params": second, "tau": 0.9}], lr=0.1)
    assert [g["tau"] for g in opt.low_rank_groups] == [0.0, 0.9]
    ranks = opt.ranks()
    train_step(model, opt, *batch_for(model))  # the modules given hold no dense parameter: only factors move
    assert opt.ranks()[0] == min(2 * ranks[0], first.max_rank // 2) and opt.ranks()[1] < 2 * ranks[1]
    opt.set_rank_bounds(second, 1, 2)
    assert opt.rank_bounds()[1] == (1, 2) and len(opt.low_rank_groups) == 2  # alone in its group already


def test_a_closure_only_loop_equals_the_explicit_loop(method="adaptive"):
    """torch's documented pattern, opt.step(closure) alone, trains exactly like zero_grad/backward/step (it used to
    crash at step 2 with adaptive and reuse stale gradients with the other one-pass methods)."""
    for method in ("adaptive", "parallel", "vanilla", "s_only"):
        runs = []
        for closure_only in (False, True):
            model = seeded(small_mlp)
            opt = DLRTOptimizer(model, lr=0.3, tau=0.1, method=method, momentum=0.9)
            for step in range(4):
                x, y = batch_for(model, seed=step)
                if closure_only:
                    train_step(model, opt, x, y)
                else:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            runs.append(model)
        for a, b in zip(runs[0].parameters(), runs[1].parameters()):
            assert torch.equal(a, b), method


def test_a_fixed_closure_that_forgets_backward_is_an_error():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1, method="fixed")
    x, y = batch_for(model)
    calls = []

    def closure():  # backward on the first call only, as a closure that computes the loss for logging would
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if not calls:
            loss.backward()
        calls.append(1)
        return loss

    with pytest.raises(RuntimeError, match="gave S no gradient"):
        opt.step(closure)


@pytest.mark.parametrize("scheduler", ["step", "plateau"])
def test_schedulers_stay_attached_to_both_optimizers_across_a_resume(scheduler):
    """After load_state_dict, a scheduler moves the low-rank lr and the dense optimizer's lr together (it moved
    only the low-rank one: the dense optimizer had replaced its group dicts)."""
    def make(model):
        opt = DLRTOptimizer(model, lr=0.1)
        sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler == "step" else
                 torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0))
        return opt, sched

    def advance(model, opt, sched, step):
        train_step(model, opt, *batch_for(model, seed=step))
        sched.step() if scheduler == "step" else sched.step(1.0)  # a loss that never improves

    model = seeded(small_mlp)
    opt, sched = make(model)
    for step in range(2):
        advance(model, opt, sched, step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    restored = seeded(small_mlp, seed=5)
    restored.load_state_dict(saved[0])
    opt2, sched2 = make(restored)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for step in range(2, 4):
        advance(model, opt, sched, step)
        advance(restored, opt2, sched2, step)
    lrs = [group["lr"] for group in opt2.param_groups]
    assert lrs == [group["lr"] for group in opt.param_groups] and len(set(lrs)) == 1 and lrs[0] < 0.1
    assert opt2.dense_optimizer.param_groups[0]["lr"] == lrs[0]  # the dict the dense steps read
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_an_optimizer_whose_layers_were_merged_refuses_to_step():
    import dlrt

    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.1)
    dlrt.merge(model)
    with pytest.raises(RuntimeError, match="replaced by dense ones"):
        train_step(model, opt, *batch_for(model))
