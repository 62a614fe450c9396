"""DLRTOptimizer's param groups: how they are made from a model or from group dicts, the layers' rank bounds, the
checks of every hyperparameter, and the ordinary torch optimizer of the parameters that are not low-rank."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import LowRankLayer, low_rank_layers
from .update_rules import RULES, STATE_POLICIES, make_rule

# The keys of each update rule, named as torch's optimizers name them. A param group holds its rule's keys only, as
# torch's do: torch's schedulers cycle group["momentum"] when the optimizer's defaults hold "momentum" (SGD) and
# betas[0] when they hold "betas" (Adam), in every group.
RULE_KEYS = {"sgd": ("momentum",), "adam": ("betas", "eps")}
RULE_DEFAULTS = {"momentum": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}  # update_rules.make_rule's


def make_defaults(**hyperparameters) -> dict:
    """DLRTOptimizer's defaults from all its hyperparameters: of the update rules' keys, the chosen rule's only."""
    kept = RULE_KEYS.get(hyperparameters["optimizer"], tuple(RULE_DEFAULTS))  # an unknown rule: refused by the check
    defaults = {key: value for key, value in hyperparameters.items() if key in kept or key not in RULE_DEFAULTS}
    if isinstance(defaults.get("betas"), list):
        defaults["betas"] = tuple(defaults["betas"])
    return defaults


def rule_key(group: dict) -> tuple:
    """(optimizer, momentum, betas, eps) of a group, for update_rules.make_rule: the group's values of its rule's
    keys, the rule's defaults for the others (a group that chose another rule than the optimizer's defaults may
    lack them; a checkpoint of dlrt 0.2 holds them all)."""
    values = {**RULE_DEFAULTS, **{key: group[key] for key in RULE_KEYS.get(group["optimizer"], ()) if key in group}}
    return group["optimizer"], values["momentum"], tuple(values["betas"]), values["eps"]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_hyperparameters(group: dict) -> None:
    """Refuse values that cannot work, naming the key and what it takes."""
    if not _finite(group["lr"]) or not group["lr"] >= 0:
        raise ValueError(f"lr must be a finite number >= 0, got {group['lr']!r}")
    if not _finite(group["tau"]):
        raise ValueError(f"tau must be a finite number (in [0, 1) when relative, >= 0 when absolute), got {group['tau']!r}")
    if group["absolute_tau"] and not group["tau"] >= 0:
        raise ValueError(f"an absolute tau must be >= 0, got {group['tau']}")
    if not group["absolute_tau"] and not 0 <= group["tau"] < 1:
        raise ValueError(f"tau (relative truncation tolerance) must be in [0, 1), got {group['tau']} (or set "
                         "absolute_tau, which compares ϑ with the tail itself)")
    if group["state_policy"] not in STATE_POLICIES:
        raise ValueError(f"unknown state_policy {group['state_policy']!r}: choose one of {', '.join(STATE_POLICIES)}")
    if group["optimizer"] not in RULES:
        raise ValueError(f"unknown optimizer {group['optimizer']!r}: choose one of {', '.join(RULES)}")
    r_min, r_max = group["r_min"], group["r_max"]
    if isinstance(r_min, bool) or not isinstance(r_min, int) or r_min < 1:
        raise ValueError(f"r_min must be an integer >= 1, got {r_min!r}")
    if r_max is not None and (isinstance(r_max, bool) or not isinstance(r_max, int) or r_max < r_min):
        raise ValueError(f"r_max must be None or an integer >= r_min = {r_min}, got {r_max!r}")
    if not isinstance(group.get("betas", ()), (tuple, list)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {group['betas']!r}")
    name, momentum, betas, eps = rule_key(group)
    if not _finite(eps) or not eps > 0:  # the rule refuses eps <= 0; eps = inf would make every Adam step zero
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    make_rule(name, momentum, betas, eps)  # checks the rule's own (momentum and betas in [0, 1))


def bounds(layer: LowRankLayer, group: dict) -> tuple[int, int]:
    r_max = layer.max_rank // 2 if group["r_max"] is None else min(group["r_max"], layer.max_rank)
    return min(group["r_min"], layer.max_rank), r_max


def factors(layers: list[LowRankLayer]) -> list[nn.Parameter]:
    return [p for layer in layers for p in (layer.U, layer.S, layer.V)]


def layers_of(items) -> list[LowRankLayer]:
    items = [items] if isinstance(items, nn.Module) else list(items)
    if not all(isinstance(item, nn.Module) for item in items):
        raise TypeError("DLRTOptimizer takes the model (or modules holding its low-rank layers), not its parameters: "
                        "it replaces a layer's factors when the rank changes, so it needs the layers. "
                        "Write DLRTOptimizer(model, lr=...) rather than DLRTOptimizer(model.parameters(), lr=...)")
    layers, seen = [], set()
    for item in items:
        for layer in low_rank_layers(item):
            if id(layer) not in seen:
                seen.add(id(layer))
                layers.append(layer)
    return layers


def groups_of(params) -> tuple[list[dict], list[nn.Module]]:
    """The low-rank param groups and the modules given (for the dense parameters and the buffers)."""
    if isinstance(params, nn.Module):
        entries = [{"params": params}]
    elif isinstance(params, dict):
        entries = [params]
    else:
        entries = list(params)
        if not all(isinstance(entry, dict) for entry in entries):
            layers_of(entries)  # raises the explanation when these are tensors
            entries = [{"params": entries}]
    modules, groups = [], []
    for entry in entries:
        given = entry["params"]
        modules += [given] if isinstance(given, nn.Module) else list(given)
        group = {key: value for key, value in entry.items() if key != "params"}
        group["layers"] = layers_of(given)
        group["params"] = factors(group["layers"])
        groups.append(group)
    return groups, modules


def make_dense_optimizer(given, params: list, defaults: dict) -> torch.optim.Optimizer:
    if isinstance(given, torch.optim.Optimizer):
        return given
    # torch refuses an empty parameter list (an all-low-rank model without biases); a placeholder keeps the code
    # paths uniform, and gives torch's schedulers a dense group to drive
    params = params or [torch.zeros(0, requires_grad=True)]
    if given is not None:
        return given(params)
    # Fused kernels step all the small tensors (biases, a classifier) in one call: on a CPU that is
    # 0.06 against 0.15 ms (foreach) for the FC net's. Torch has them for floating tensors on a CPU or GPU.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    lr = defaults["lr"]
    if defaults["optimizer"] == "adam":  # capturable: its step counts stay on the GPU, so a CUDA graph can hold it
        capturable = fused and all(p.is_cuda for p in params)
        return torch.optim.Adam(params, lr=lr, betas=defaults["betas"], eps=defaults["eps"], fused=fused,
                                capturable=capturable)
    return torch.optim.SGD(params, lr=lr, momentum=defaults["momentum"], fused=fused)
