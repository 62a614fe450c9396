"""torch's LR schedulers drive DLRTOptimizer as they drive torch.optim.SGD and Adam: every scheduler of
torch.optim.lr_scheduler, on a model with low-rank and dense layers, on an all-low-rank one and with a torch SGD as
the dense optimizer; the step taken is the one a fresh optimizer at the scheduled lr and momentum takes."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as sched

from dlrt import DLRTOptimizer, LowRankLinear

from helpers import batch_for, plain_step, seeded, small_mlp

STEPS = 6
LR, MOMENTUM = 0.05, 0.9

# name -> (update rule, the scheduler made for an optimizer)
SCHEDULERS = {
    "LambdaLR": ("sgd", lambda opt: sched.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))),
    "MultiplicativeLR": ("sgd", lambda opt: sched.MultiplicativeLR(opt, lambda epoch: 0.8)),
    "StepLR": ("sgd", lambda opt: sched.StepLR(opt, step_size=2, gamma=0.5)),
    "MultiStepLR": ("sgd", lambda opt: sched.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)),
    "ConstantLR": ("sgd", lambda opt: sched.ConstantLR(opt, factor=0.5, total_iters=3)),
    "LinearLR": ("sgd", lambda opt: sched.LinearLR(opt, start_factor=0.25, total_iters=4)),
    "ExponentialLR": ("sgd", lambda opt: sched.ExponentialLR(opt, gamma=0.8)),
    "PolynomialLR": ("sgd", lambda opt: sched.PolynomialLR(opt, total_iters=4, power=2.0)),
    "CosineAnnealingLR": ("sgd", lambda opt: sched.CosineAnnealingLR(opt, T_max=4)),
    "CosineAnnealingWarmRestarts": ("sgd", lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=3)),
    "ChainedScheduler": ("sgd", lambda opt: sched.ChainedScheduler(
        [sched.ConstantLR(opt, factor=0.5, total_iters=3), sched.ExponentialLR(opt, gamma=0.8)], optimizer=opt)),
    "SequentialLR": ("sgd", lambda opt: sched.SequentialLR(
        opt, [sched.ConstantLR(opt, factor=0.5, total_iters=3), sched.ExponentialLR(opt, gamma=0.8)], milestones=[3])),
    "ReduceLROnPlateau": ("sgd", lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=0)),
    "CyclicLR": ("sgd", lambda opt: sched.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=False)),
    "CyclicLR-momentum": ("sgd", lambda opt: sched.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)),
    "CyclicLR-adam": ("adam", lambda opt: sched.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)),
    "OneCycleLR": ("sgd", lambda opt: sched.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)),
    "OneCycleLR-adam": ("adam", lambda opt: sched.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)),
}

MODELS = {
    "low-rank and dense": lambda: small_mlp(),
    "all low-rank": lambda: nn.Sequential(LowRankLinear(20, 16, 4, bias=False), nn.ReLU(),
                                          LowRankLinear(16, 4, 3, bias=False)),
}


def test_every_scheduler_of_torch_is_tried():
    """A scheduler that a newer torch adds fails here until it has a line in SCHEDULERS."""
    schedulers = {name for name, cls in vars(sched).items() if inspect.isclass(cls) and not name.startswith("_")
                  and issubclass(cls, (sched.LRScheduler, sched.ReduceLROnPlateau)) and cls is not sched.LRScheduler}
    assert schedulers <= {name.split("-")[0] for name in SCHEDULERS}


def momentum_of(group: dict, rule: str) -> float:
    return group["betas"][0] if rule == "adam" else group["momentum"]


def make_optimizer(model, rule, lr, momentum, torch_dense):
    """DLRTOptimizer at this lr and momentum (beta1 for adam), optionally with a torch optimizer of the same rule
    for the dense parameters."""
    rule_args = dict(betas=(momentum, 0.999)) if rule == "adam" else dict(momentum=momentum)
    dense = None
    if torch_dense:
        dense = ((lambda p: torch.optim.Adam(p, lr=lr, **rule_args)) if rule == "adam"
                 else lambda p: torch.optim.SGD(p, lr=lr, **rule_args))
    return DLRTOptimizer(model, lr=lr, tau=0.1, optimizer=rule, dense_optimizer=dense, **rule_args)


def torch_reference(rule: str, make_scheduler, groups: int, metric: float) -> list[tuple[float, float]]:
    """(lr, momentum or beta1) of each step of the scheduler driving torch's own optimizer."""
    params = [{"params": [nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    opt = (torch.optim.Adam(params, lr=LR, betas=(MOMENTUM, 0.999)) if rule == "adam"
           else torch.optim.SGD(params, lr=LR, momentum=MOMENTUM))
    scheduler, seen = make_scheduler(opt), []
    for _ in range(STEPS):
        seen.append((opt.param_groups[0]["lr"], momentum_of(opt.param_groups[0], rule)))
        opt.step()
        scheduler.step(metric) if isinstance(scheduler, sched.ReduceLROnPlateau) else scheduler.step()
    return seen


@pytest.mark.parametrize("torch_dense", [False, True], ids=["own dense optimizer", "torch dense optimizer"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_drives_the_step(name, model_name, torch_dense):
    rule, make_scheduler = SCHEDULERS[name]
    model = seeded(MODELS[model_name])
    opt = make_optimizer(model, rule, LR, MOMENTUM, torch_dense)
    scheduler = make_scheduler(opt)
    metric = 1.0  # ReduceLROnPlateau: a metric that never improves, so the lr falls
    expected = torch_reference(rule, make_scheduler, len(opt.param_groups), metric)
    x, y = batch_for(model)
    for step in range(STEPS):
        lr, momentum = (opt.param_groups[0]["lr"], momentum_of(opt.param_groups[0], rule))
        assert (lr, momentum) == pytest.approx(expected[step]), f"step {step}: not the schedule torch's optimizer gets"
        assert all((g["lr"], momentum_of(g, rule)) == (lr, momentum) for g in opt.param_groups)
        # the same step by a fresh optimizer made at this lr and momentum, with the same state
        twin_model, state, dense_state = copy.deepcopy((model, opt.state, opt.dense_optimizer.state))
        fresh = make_optimizer(twin_model, rule, lr, momentum, torch_dense)
        fresh.state.update(state)
        fresh.dense_optimizer.state.update(dense_state)
        plain_step(model, opt, x, y)
        plain_step(twin_model, fresh, x, y)
        for (key, p), q in zip(model.state_dict().items(), twin_model.state_dict().values()):
            torch.testing.assert_close(p, q, msg=f"step {step}: {key} differs from a fresh optimizer's at lr {lr}")
        scheduler.step(metric) if isinstance(scheduler, sched.ReduceLROnPlateau) else scheduler.step()
