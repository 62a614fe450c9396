"""One DLRT step per method, over the low-rank layers of a step: the functional core of DLRTOptimizer.

A step is taken in two halves around one host synchronisation (dlrt.step_paths orders them, dlrt.graphs replays
each half from a CUDA graph): `prepare` computes what can be computed without reading a device value on the host
(the augmented cores), `decide_ranks` takes the cores' SVDs and truncation decisions, the new ranks are read once,
and `finish` writes the new factors and optimizer states. Each method is one class with those two halves; `METHODS`
maps a method's name to it.

Each layer of a step is a LayerStep: its factors and their gradients as tensors, its optimizer state ({"K", "L",
"S"}: the update rule's state of each factor, as matrices in the layer's current bases) and its param group (lr, ϑ,
rank bounds, rule). The methods work on these tensors only, in place where a factor keeps its shape; factors of a new
shape they leave in the LayerStep for dlrt.step_paths to write into the layer.

The parts of a step carry torch.profiler labels ("dlrt::qr", "dlrt::svd", ...: PARTS), so a profile shows where
a step's time goes (dlrt.bench's breakdown suite reads them); outside a profile they are not made at all.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function

from . import basis_cycle
from . import integrators
from . import linalg
from .distributed import all_reduce_mean
from .groups import rule_key
from .layers import LowRankLayer, StepInputs
from .update_rules import change_basis, lift_state, make_rule


PARTS = ("qr", "svd", "truncation", "rank_sync", "project_gradient", "set_factors", "update_rule", "state_moves",
         "dense_params_step")


def part(name: str):
    """The profiler label of a part of the step, while a profiler records: a label costs about 17 µs even then
    not (26 of them were 2-3 % of the FC net's CPU step), the check 0.3 µs."""
    return record_function(f"dlrt::{name}") if torch.autograd._profiler_enabled() else contextlib.nullcontext()


@dataclass
class LayerStep:
    """One layer's part of a step, as tensors. The methods read the factors, their gradients, the rule's state and
    the group's settings, update S (and vanilla's U and V) in place, move the state, and leave factors of a new shape
    in `new_factors`, which dlrt.step_paths writes into the layer. They never touch the layer itself."""

    state: dict  # {"K": {...}, "L": {...}, "S": {...}}
    group: dict  # the layer's param group
    r_min: int  # the layer's rank bounds (its group's, capped by the layer's size)
    r_max: int
    U: torch.Tensor  # the factors (detached: an in-place update is the layer's), and their gradients G V, U^T G V, G^T U
    S: torch.Tensor
    V: torch.Tensor
    grad_U: torch.Tensor | None
    grad_S: torch.Tensor | None
    grad_V: torch.Tensor | None
    out_dim: int
    in_dim: int
    inputs: StepInputs | None  # the x and dy the backward recorded (adaptive), for project_gradient
    project_gradient: Callable  # (Ũ, Ṽ) -> Ũ^T G Ṽ from those inputs (the layer's, linear or conv)
    layer: LowRankLayer | None = None  # where step_paths writes new_factors: never read by a method
    new_bases: tuple | None = None  # Ũ, Ṽ
    core: torch.Tensor | None = None  # the S-step at the augmented bases
    svd: tuple | None = None  # (P, σ, Qh) of the core
    edit_scale: torch.Tensor | None = None  # how the gradients were rescaled since the backward (note_gradient_edits)
    # a basis step of a cycle (basis_every > 1, dlrt.basis_cycle): its SVD is of the core the cycle trained, and
    # it ends augmented, untruncated
    in_cycle: bool = False
    new_factors: tuple | None = None  # U, S, V at a new shape, for the layer

    @classmethod
    def of(cls, layer: LowRankLayer, state: dict, group: dict, r_min: int, r_max: int, in_cycle: bool = False):
        U, S, V = layer.U, layer.S, layer.V
        return cls(state, group, r_min, r_max, U.detach(), S.detach(), V.detach(), U.grad, S.grad, V.grad,
                   layer.out_dim, layer.in_dim, layer.step_inputs, layer.project_gradient, layer, in_cycle=in_cycle)

    @property
    def rank(self) -> int:
        return self.S.shape[0]


@dataclass
class StepPlan:
    """What the first half of a step hands to the second."""

    steps: list[LayerStep]  # the layers at a basis step that have gradients
    checked_shortcuts: bool = False  # the CPU's self-checking QR and Gram-matrix SVD (dlrt.linalg)
    new_ranks: torch.Tensor | None = None  # one per step, where the SVDs were taken
    coefficient_steps: list[LayerStep] = field(default_factory=list)  # layers of groups between basis steps
    edits_unhonoured: torch.Tensor | None = None  # whether a layer's S.grad was edited other than by a rescaling


def note_gradient_edits(steps: list[LayerStep]) -> torch.Tensor | None:
    """How each layer's gradients were rescaled since its backward (clip_grad_norm_, a GradScaler's unscale_), read
    from S.grad against the S gradient the backward recorded, into step.edit_scale: the Ũ^T G Ṽ block, formed from
    the recorded x and dy, is multiplied by it, so that the step honours the edit as the other blocks (formed from
    U.grad, V.grad and S.grad) do. Returns whether any layer's S.grad is not a rescaling of the recorded one (a hook
    that did something else), as one bool tensor that the optimizer reads on the host with the new ranks.
    Data parallel: taken before the gradients are averaged, since each worker recorded its own x and dy."""
    unhonoured = []
    for step in steps:
        reference, grad = (step.inputs.reference_S if step.inputs is not None else None), step.grad_S
        if reference is None or grad is None:
            continue
        tiny = torch.finfo(grad.dtype).tiny
        step.edit_scale = (grad * reference).sum() / (reference * reference).sum().clamp_min(tiny)
        residual = (grad - step.edit_scale * reference).norm()
        unhonoured.append(residual > 1e-3 * grad.norm() + tiny)
    return torch.stack(unhonoured).any() if unhonoured else None


# ---------------------------------------------------------------------------------------------
# update directions: one foreach call per update rule
# ---------------------------------------------------------------------------------------------


def directions(entries: list[tuple[dict, torch.Tensor, dict]]) -> list[torch.Tensor]:
    """Update directions for (state, gradient, group) entries: the groups' update rules applied with torch's
    foreach kernels, one call for all entries of the same rule."""
    found: list[torch.Tensor | None] = [None] * len(entries)
    by_rule = defaultdict(list)
    for index, (_, _, group) in enumerate(entries):
        by_rule[rule_key(group)].append(index)
    for key, indices in by_rule.items():
        rule = make_rule(*key)
        with part("update_rule"):
            found_here = rule.directions([entries[i][0] for i in indices], [entries[i][1] for i in indices])
        for index, direction in zip(indices, found_here):
            found[index] = direction
    return found


def kl_directions(steps: list[LayerStep]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """dK, dL per layer, from the gradients G V0 (in U.grad) and G^T U0 (in V.grad)."""
    found = directions([(s.state["K"], s.grad_U, s.group) for s in steps] +
                       [(s.state["L"], s.grad_V, s.group) for s in steps])
    return list(zip(found[: len(steps)], found[len(steps):]))


def s_directions(steps: list[LayerStep], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return directions([(s.state["S"], grad, s.group) for s, grad in zip(steps, grads)])


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


class Method:
    """A method's two halves. `passes`: forward/backward passes per batch; `changes_ranks`: whether `finish`
    takes new ranks (from decide_ranks) or keeps them."""

    passes = 1
    changes_ranks = False
    records_step_inputs = False  # whether the layers' backward must record x and dy (StepInputs)
    trains_bases = True  # whether U and V need gradients (s_only freezes them: the backward skips G V, G^T U)

    def prepare(self, plan: StepPlan, world_size: int) -> None:
        """The half before the host sync; nothing in it may read a device value on the host."""

    def finish(self, plan: StepPlan, new_ranks: list[int] | None) -> None:
        raise NotImplementedError


class _RankAdaptive(Method):
    changes_ranks = True

    uses_kl_in_cores = False  # whether `cores` reads dK and dL: else they are freed before it (a rank's n x r each)

    def prepare(self, plan: StepPlan, world_size: int) -> None:
        steps = [s for s in plan.steps if not s.in_cycle]  # a cycle's basis step truncates before it augments
        if not steps:
            return
        kl = kl_directions(steps)
        # the new directions Ũ, Ṽ from the K- and L-step directions; all U's and V's of the same shape in one QR
        counts = [integrators.augmentation_size(s.rank, s.out_dim, s.in_dim) for s in steps]
        with part("qr"):
            bases = [s.U for s in steps] + [s.V for s in steps]
            directions = [dK for dK, _ in kl] + [dL for _, dL in kl]
            found = linalg.new_directions_of_many(bases, directions, counts * 2, projected=plan.checked_shortcuts)
        for step, U_new, V_new in zip(steps, found[: len(steps)], found[len(steps):]):
            step.new_bases = (U_new, V_new)
        del found
        if not self.uses_kl_in_cores:
            kl = None
        self.cores(steps, kl, world_size)

    def cores(self, steps: list[LayerStep], kl: list | None, world_size: int) -> None:
        raise NotImplementedError

    def finish(self, plan: StepPlan, new_ranks: list[int]) -> None:
        """New factors at the new ranks, and the states moved into the new bases."""
        for step, r1 in zip(plan.steps, new_ranks):
            if step.in_cycle:
                with part("set_factors"):
                    basis_cycle.truncate_and_augment(step, r1, plan.checked_shortcuts, directions)
                continue
            state, policy = step.state, step.group["state_policy"]
            rule = make_rule(*rule_key(step.group))
            r0 = step.rank
            P, sigma, Qh = step.svd
            P1, Q1 = P[:, :r1], Qh[:r1].T
            U_new, V_new = step.new_bases
            with part("set_factors"):
                step.new_factors = (integrators.rotate(step.U, U_new, P1), torch.diag(sigma[:r1]),
                                    integrators.rotate(step.V, V_new, Q1))
            with part("state_moves"):
                state["K"] = change_basis(state["K"], rule, policy, None, Q1[:r0])  # V0^T V1
                state["L"] = change_basis(state["L"], rule, policy, None, P1[:r0])  # U0^T U1
                state["S"] = change_basis(state["S"], rule, policy, P1, Q1)


class Adaptive(_RankAdaptive):
    """The rank-adaptive augmented step (PAPER.md §1): the S-step at [U0, Ũ], [V0, Ṽ] with the gradient
    Û^T G V̂ formed from the one backward (Ũ^T G Ṽ from the inputs the backward recorded)."""

    records_step_inputs = True

    def cores(self, steps, kl, world_size):
        blocks = []
        for s in steps:
            with part("project_gradient"):
                block = s.project_gradient(*s.new_bases)
                blocks.append(block if s.edit_scale is None else block * s.edit_scale)
            s.inputs.clear()  # x and dy are done with: freed before the cores are made (issue 18)
        if world_size > 1:
            all_reduce_mean(blocks)
        grads = [integrators.augmented_gradient(s.grad_S, s.grad_U, s.grad_V, *s.new_bases, block)
                 for s, block in zip(steps, blocks)]
        with part("state_moves"):
            for step, grad in zip(steps, grads):
                step.state["S"] = lift_state(step.state["S"], grad.shape[0])
        for step, grad, dS in zip(steps, grads, s_directions(steps, grads)):
            step.core = integrators.gradient_step(integrators.augmented_core(step.S, grad.shape[0]), dS, step.group["lr"])


class Parallel(_RankAdaptive):
    """The parallel integrator (Ceruti, Kusch, Lubich, Sulz 2024): K, L and S from the same point, the core
    [[S̄, L1^T Ṽ], [Ũ^T K1, 0]]."""

    uses_kl_in_cores = True

    def cores(self, steps, kl, world_size):
        for step, dS, (dK, dL) in zip(steps, s_directions(steps, [s.grad_S for s in steps]), kl):
            lr = step.group["lr"]
            S1 = integrators.gradient_step(step.S, dS, lr)
            step.core = integrators.parallel_core(S1, dK, dL, *step.new_bases, lr)
            step.state["S"] = lift_state(step.state["S"], step.core.shape[0])


class SOnly(Method):
    """U and V frozen, S trained (the fine-tuning phase of the paper's ImageNet protocol)."""

    trains_bases = False

    def finish(self, plan, new_ranks):
        s_steps(plan.steps)


class Vanilla(Method):
    """Plain factorised training W = U V^T, simultaneous gradient steps on U and V. With S = I (absorb_singular_values)
    the layer's U.grad = G V and V.grad = G^T U are exactly dL/dU and dL/dV."""

    def finish(self, plan, new_ranks):
        for step, (dU, dV) in zip(plan.steps, kl_directions(plan.steps)):
            integrators.gradient_step(step.U, dU, step.group["lr"], out=step.U)
            integrators.gradient_step(step.V, dV, step.group["lr"], out=step.V)


class Fixed(Method):
    """Fixed-rank KLS: U1 = orth(K1), V1 = orth(L1), then the S-step at the moved basis, which needs a second
    forward/backward (`second_pass`)."""

    passes = 2

    @staticmethod
    def basis_update(steps: list[LayerStep], checked_shortcuts: bool) -> None:
        qr = lambda X: linalg.tall_qr(X, checked=checked_shortcuts)
        for step, (dK, dL) in zip(steps, kl_directions(steps)):
            state, policy = step.state, step.group["state_policy"]
            rule, lr = make_rule(*rule_key(step.group)), step.group["lr"]
            U0, S0, V0 = step.U, step.S, step.V
            with part("qr"):
                U1, S_tilde, V1, U_overlap, V_overlap = integrators.fixed_rank_basis(
                    U0, S0, V0, integrators.k_step(U0, S0, dK, lr), integrators.l_step(V0, S0, dL, lr), qr=qr)
            step.new_factors = (U1, S_tilde, V1)
            with part("state_moves"):
                state["K"] = change_basis(state["K"], rule, policy, None, V_overlap)
                state["L"] = change_basis(state["L"], rule, policy, None, U_overlap)
                state["S"] = change_basis(state["S"], rule, policy, U_overlap, V_overlap)

    def finish(self, plan, new_ranks):
        s_steps(plan.steps)


def s_steps(steps: list[LayerStep]) -> None:
    """S1 = S0 - lr dS for the layers whose S has a gradient."""
    steps = [s for s in steps if s.grad_S is not None]
    for step, dS in zip(steps, s_directions(steps, [s.grad_S for s in steps])):
        integrators.gradient_step(step.S, dS, step.group["lr"], out=step.S)


METHODS: dict[str, Method] = {"adaptive": Adaptive(), "parallel": Parallel(), "fixed": Fixed(), "s_only": SOnly(),
                              "vanilla": Vanilla()}


# ---------------------------------------------------------------------------------------------
# the rank decision
# ---------------------------------------------------------------------------------------------


def decomposed(step: LayerStep) -> torch.Tensor:
    """What the step's SVD is taken of: the augmented core, or in a cycle's basis step the core the cycle trained."""
    return step.S if step.in_cycle else step.core


def decide_ranks(plan: StepPlan, on_host: bool, bounds: tuple[torch.Tensor, ...]) -> None:
    """The SVD of each core (of the current S in a cycle's basis step) and all truncation decisions as one tensor
    (plan.new_ranks). `bounds`: ϑ, relative, r_min and r_max per step as tensors on the device where the ranks are
    decided (the host when on_host)."""
    cores = [decomposed(step) for step in plan.steps]
    with part("svd"):
        if on_host:  # the copy of the cores is the step's one host sync, and the ranks are read for free
            found, sigmas = linalg.svds_on_host(cores)
        else:
            found = linalg.svds(cores)
            sigmas = [sigma for _, sigma, _ in found]
    for step, svd in zip(plan.steps, found):
        step.svd = svd
    with part("truncation"):
        plan.new_ranks = integrators.truncation_rank_tensor(sigmas, *bounds)


@torch.no_grad()
def absorb_singular_values(layers: list[LowRankLayer]) -> None:
    """W = U S V^T -> (U √S)(V √S)^T with S = I: the factorisation vanilla training steps on."""
    for layer in layers:
        P, sigma, Qh = torch.linalg.svd(layer.S)
        root = sigma.sqrt()
        layer.set_factors(layer.U @ P * root, torch.eye(layer.rank, dtype=layer.S.dtype, device=layer.S.device),
                          layer.V @ Qh.T * root)


@contextlib.contextmanager
def frozen(params: list[nn.Parameter]):
    """requires_grad off for these parameters inside the block, back to what it was after."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
