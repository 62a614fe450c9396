"""state_policy="restart" (the published FC code's optimizer, results/ERRATA.md finding 4) through DLRTOptimizer."""

import torch
from torch import nn

from dlrt.layers import LowRankLinear
from dlrt.optim import DLRTOptimizer


def train(steps: int = 4, **options):
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(20, 16, rank=4), nn.ReLU(), LowRankLinear(16, 5, rank=3))
    opt = DLRTOptimizer(model, tau=0.1, **options)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_momentum_that_restarts_every_step_is_plain_sgd():
    restarted, _ = train(lr=0.05, optimizer="sgd", momentum=0.9, state_policy="restart")
    # the dense parameters (the biases) keep their momentum either way: the policy is the factors'
    plain, _ = train(lr=0.05, optimizer="sgd", momentum=0.0,
                     dense_optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    for ours, theirs in zip(restarted.parameters(), plain.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_restarted_adam_keeps_no_moments_between_steps_and_one_global_count():
    model, opt = train(lr=1e-3, optimizer="adam", state_policy="restart")
    for layer in model[0], model[2]:
        for part in opt.state[layer].values():
            assert not part["exp_avg"].any() and not part["exp_avg_sq"].any()
            assert part["mass"].dim() == 0 and part["mass_sq"].dim() == 0


def test_the_authors_fc_procedure_restarts_adam_only_in_its_rank_adaptive_phase():
    """Their adaptive layers make new K, L, S variables every batch; their fixed-rank layers assign to the same ones,
    so the fine-tuning's Adam keeps its moments in place (ERRATA finding 4): experiment=fc_mnist_authors."""
    from dlrt.experiments.runtime import optimizer_settings, phases

    from helpers import compose_config

    cfg = compose_config(["experiment=fc_mnist_authors"])
    (_, train_method, _), (_, finetune_method, _) = phases(cfg)
    assert optimizer_settings(cfg, train_method)["state_policy"] == "restart"
    assert optimizer_settings(cfg, finetune_method)["state_policy"] == "keep"
    ours = compose_config(["experiment=fc_mnist"])  # unset: the fine-tuning takes the method's policy
    assert optimizer_settings(ours, "fixed")["state_policy"] == optimizer_settings(ours, "adaptive")["state_policy"]
    assert optimizer_settings(compose_config(["experiment=fc_mnist", "finetune.state_policy=reset"]),
                              "fixed")["state_policy"] == "reset"
