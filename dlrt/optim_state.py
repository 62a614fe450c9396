"""DLRTOptimizer's state_dict: torch's layout (state by index, param groups by value), with low-rank layers where
torch has parameters, since a rank change replaces a layer's factors; the dense optimizer's own state_dict beside."""

from __future__ import annotations

from collections import defaultdict

import torch

from .basis_cycle import BASIS_CLOCK
from .groups import factors

LOW_RANK_KEYS = ("layers", "params")  # the keys of a low-rank group that are not settings


def saved(layers: list, state: dict, groups: list[dict], dense: dict) -> dict:
    """The state of `layers` (by index) and their groups' settings, with the dense optimizer's state_dict `dense`."""
    index = {id(layer): i for i, layer in enumerate(layers)}
    return {
        "state": {index[id(layer)]: {part: dict(entries) for part, entries in layer_state.items()}
                  for layer, layer_state in state.items() if id(layer) in index},
        "param_groups": [{**{k: v for k, v in group.items() if k not in LOW_RANK_KEYS},
                          "layers": [index[id(layer)] for layer in group["layers"]]} for group in groups],
        "dense": dense,
    }


def restored(state_dict: dict, layers: list, defaults: dict) -> tuple[list[dict], defaultdict]:
    """The low-rank groups (over `layers`, with the settings a state saved before them lacks taken from `defaults`)
    and the state by layer, its tensors on each layer's device."""
    saved_groups = state_dict["param_groups"]
    held = sum(len(group["layers"]) for group in saved_groups)
    if held != len(layers):
        raise ValueError(f"the optimizer state holds {held} low-rank layers, this optimizer {len(layers)}")
    groups = []
    for saved_group in saved_groups:
        group = {key: value for key, value in saved_group.items() if key != "layers"}
        group["layers"] = [layers[i] for i in saved_group["layers"]]
        group["params"] = factors(group["layers"])
        for key, value in defaults.items():
            group.setdefault(key, value)
        group.setdefault(BASIS_CLOCK, 0)
        groups.append(group)
    state = defaultdict(dict)
    for i, layer_state in state_dict["state"].items():
        layer = layers[int(i)]
        state[layer] = {part: {name: value.to(layer.U.device) if isinstance(value, torch.Tensor) else value
                               for name, value in entries.items()} for part, entries in layer_state.items()}
    return groups, state
