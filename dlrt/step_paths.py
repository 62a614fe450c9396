"""The three ways a DLRTOptimizer step runs over its low-rank param groups. Each group's method (dlrt.functional)
does the mathematics; these functions gather the layers, batch them and order the work.

- batched (the default): `prepare_cores` (every layer's new directions and augmented core, nothing read on the
  host), `decide_ranks` (the cores' SVDs and all truncation decisions, as one tensor), one read of the new ranks on
  the host, and `finish` (the new factors and states). dlrt.graphs replays the first and the last from CUDA graphs.
- `layer_by_layer` (placement.layerwise): the same, one layer at a time, holding less memory.
- `two_pass` (method="fixed"): the basis update, a second forward/backward through the closure, the S-step.

`state_of(layer, group)` gives a layer's optimizer state; `synchronise()` averages the gradients over data-parallel
workers (a no-op on one).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import functional
from . import integrators
from .basis_cycle import is_basis_step
from .distributed import world_size
from .groups import bounds
from .placement import Placement, factor_numel


def method_of(step: functional.LayerStep) -> functional.Method:
    return functional.METHODS[step.group["method"]]


def layer_steps(groups: list[dict], state_of: Callable) -> tuple[list[functional.LayerStep], list[functional.LayerStep]]:
    """LayerSteps for the layers that have a gradient (of U at a basis step; of S at a coefficient step and for
    s_only): those of groups at a basis step, and those of groups at a coefficient step."""
    basis, coefficient = [], []
    for group in groups:
        at_basis = is_basis_step(group)
        for layer in group["layers"]:
            grad = layer.U.grad if at_basis and group["method"] != "s_only" else layer.S.grad
            if grad is not None:
                step = functional.LayerStep.of(layer, state_of(layer, group), group, *bounds(layer, group),
                                               in_cycle=group["basis_every"] > 1)
                (basis if at_basis else coefficient).append(step)
    return basis, coefficient


def _by_method(steps: list[functional.LayerStep]) -> dict[str, list[functional.LayerStep]]:
    found: dict[str, list[functional.LayerStep]] = {}
    for step in steps:
        found.setdefault(step.group["method"], []).append(step)
    return found


def ranked_steps(steps: list[functional.LayerStep]) -> list[functional.LayerStep]:
    """The steps whose method decides a new rank (in the plan's order: plan.new_ranks follows it)."""
    return [step for step in steps if method_of(step).changes_ranks]


def ranks_after(plan: functional.StepPlan, new_ranks: list[int]) -> list[int]:
    """The ranked layers' ranks once `finish` has run: the truncated ranks, augmented again in a cycle's basis step."""
    return [r1 + integrators.augmentation_size(r1, s.layer.out_dim, s.layer.in_dim) if s.in_cycle else r1
            for s, r1 in zip(ranked_steps(plan.steps), new_ranks)]


def prepare_cores(groups: list[dict], state_of: Callable, placement: Placement, synchronise: Callable) -> functional.StepPlan:
    """The first half of a batched step: the new directions and the cores of every layer with a gradient."""
    steps, coefficient_steps = layer_steps(groups, state_of)
    edits_unhonoured = functional.note_gradient_edits(steps)  # before the gradients are averaged over workers
    synchronise()
    layers = [step.layer for step in steps]
    plan = functional.StepPlan(steps, placement.takes_checked_shortcuts(layers), coefficient_steps=coefficient_steps,
                        edits_unhonoured=edits_unhonoured)
    for name, same in _by_method(steps).items():
        functional.METHODS[name].prepare(functional.StepPlan(same, plan.checked_shortcuts), world_size())
    return plan


def decide_ranks(plan: functional.StepPlan, placement: Placement) -> None:
    """The SVD of each core and all truncation decisions as one tensor (plan.new_ranks, one per step of a
    rank-changing method, left where the SVDs were taken)."""
    ranked = functional.StepPlan(ranked_steps(plan.steps))
    if not ranked.steps:
        return
    cores = [functional.decomposed(step) for step in ranked.steps]
    on_host = placement.svds_on_host(cores)
    device = torch.device("cpu") if on_host else cores[0].device
    settings = tuple((s.group["tau"], not s.group["absolute_tau"], s.r_min, s.r_max) for s in ranked.steps)
    functional.decide_ranks(ranked, on_host, truncation_settings(device, settings))
    plan.new_ranks = ranked.new_ranks


@functools.lru_cache(maxsize=64)
def truncation_settings(device: torch.device, settings: tuple) -> tuple[torch.Tensor, ...]:
    """ϑ, relative, r_min and r_max of a step's layers as tensors on `device`: made once per setting, so a step
    copies no number to the device."""
    taus, relative, r_min, r_max = zip(*settings)
    return (torch.tensor(taus, dtype=torch.float64, device=device), torch.tensor(relative, device=device),
            torch.tensor(r_min, device=device), torch.tensor(r_max, device=device))


def finish(plan: functional.StepPlan, new_ranks: list[int] | None) -> None:
    """The second half of a batched step: the factors at `new_ranks` (one per step of a rank-changing method, as
    plan.new_ranks) and the coefficient steps."""
    rank_of = dict(zip(map(id, ranked_steps(plan.steps)), new_ranks or ()))
    for name, same in _by_method(plan.steps).items():
        method = functional.METHODS[name]
        method.finish(functional.StepPlan(same, plan.checked_shortcuts),
                      [rank_of[id(step)] for step in same] if method.changes_ranks else None)
    write_new_factors(plan.steps)
    functional.s_steps(plan.coefficient_steps)


def write_new_factors(steps: list[functional.LayerStep]) -> None:
    """The factors of a new shape (or, for fixed, a new basis) that the methods left, into their layers (new
    Parameters, or a copy into the old ones at the same shape: the "set_factors" part of a profile is the methods'
    forming of them)."""
    for step in steps:
        if step.new_factors is not None:
            step.layer.set_factors(*step.new_factors)
            step.new_factors = None


def takes_layer_by_layer(groups: list[dict], placement: Placement) -> bool:
    """Whether this step goes one layer at a time: a rank-changing step whose placement asks it."""
    changing = [g for g in groups if functional.METHODS[g["method"]].changes_ranks and is_basis_step(g)]
    return bool(changing) and placement.layer_by_layer([layer for g in groups for layer in g["layers"]])


def layer_by_layer(groups: list[dict], state_of: Callable, placement: Placement, synchronise: Callable,
                   warn_unhonoured_edits: Callable) -> list[functional.LayerStep]:
    """A batched step's work, one layer at a time: the same results bit for bit with less memory
    (docs/performance.md); the factors' gradients are None after it. Returns the coefficient steps, left to `finish`."""
    steps, coefficient_steps = layer_steps(groups, state_of)
    edits_unhonoured = functional.note_gradient_edits(steps)
    synchronise()
    warn_unhonoured_edits(edits_unhonoured)
    checked = placement.takes_checked_shortcuts([step.layer for step in steps])
    # Smallest factors first: a layer's step makes temporaries in proportion to its factors, so the largest run
    # last, when the most recorded x and dy and gradients are freed (timing study, rank 640: 298 MiB, 324 with
    # its first layer, the smallest, last; VGG16: the convs' records go before the classifier's step).
    steps = sorted(steps, key=lambda step: -factor_numel(step.layer))
    while steps:  # popped from the end, so that a finished layer's bases, core and SVD are freed with its plan
        plan = functional.StepPlan([steps.pop()], checked)
        step, method = plan.steps[0], method_of(plan.steps[0])
        factors = (step.layer.U, step.layer.S, step.layer.V)  # at a new rank `finish` replaces them
        method.prepare(plan, world_size())
        if step.inputs is not None and not step.in_cycle:  # x and dy are read (a cycle's basis step reads
            step.inputs.clear()                           # them in finish)
        decide_ranks(plan, placement)
        method.finish(plan, plan.new_ranks.tolist() if plan.new_ranks is not None else None)
        write_new_factors(plan.steps)
        for factor in factors:
            factor.grad = None
    return coefficient_steps


def two_pass(groups: list[dict], state_of: Callable, placement: Placement, synchronise: Callable,
             closure: Callable | None, zero_grad: Callable) -> functional.StepPlan:
    """The basis update of method="fixed", then its second forward/backward at the moved basis (closure). Returns
    the plan whose `finish` takes the S-steps."""
    if closure is None:
        raise RuntimeError("method='fixed' needs step(closure): its S-step is taken at the moved basis, so the closure "
                           "must zero the gradients, recompute the loss and call backward()")
    synchronise()
    steps, _ = layer_steps(groups, state_of)  # basis_every is 1 for `fixed`: every step is a basis step
    layers = [layer for group in groups for layer in group["layers"]]
    if not steps and any(layer.U.requires_grad for layer in layers):
        raise RuntimeError("method='fixed': no low-rank layer has a gradient after the closure; the closure must "
                           "compute the loss and call backward()")
    functional.Fixed.basis_update(steps, placement.takes_checked_shortcuts(layers))
    write_new_factors(steps)
    zero_grad()
    # The second pass needs only S.grad (and the dense parameters' gradients): with U and V frozen the backward
    # skips G V and G^T U, a third of a low-rank layer's backward.
    with torch.enable_grad(), functional.frozen([p for s in steps for p in (s.layer.U, s.layer.V)]):
        closure()
    if any(s.layer.S.grad is None for s in steps):
        raise RuntimeError("method='fixed': the closure's second call gave S no gradient, so the S-step cannot be "
                           "taken; the closure must zero the gradients, recompute the loss and call backward() every "
                           "time it is called")
    synchronise()
    # the S-step reads the moved factors and the second pass's S gradients
    return functional.StepPlan([functional.LayerStep.of(s.layer, s.state, s.group, s.r_min, s.r_max) for s in steps])
