"""The basis step of a cycle (basis_every = k > 1): truncate the core the cycle trained, then augment with this
batch's gradient and take the S-step at the augmented bases, without truncating.

Between two basis steps the layer keeps the augmented bases [U, Ũ], [V, Ṽ] of the last one, and the coefficient
steps train the 2r x 2r core in them, as the authors' later code does (RobustDLRT, `num_local_iter`): the new
directions of one batch get k - 1 steps of training before the truncation judges them. Where the truncation falls
differs: RobustDLRT truncates after the cycle's last S-step, here it opens the next basis step, so that no step
between two basis steps needs an SVD or the host, and the factors keep their shapes from cycle to cycle (2r1, while
r1 holds), so that the CUDA graphs of both kinds of step are replayed, not dropped at every truncation. The gradient of the basis step is taken before that truncation,
at a weight that differs from the truncated one by the dropped tail (at most ϑ ‖S‖): the step projects it onto the
truncated bases (G V1 = (G V) Q1, G^T U1 = (G^T U) P1, U1^T G V1 = P1^T (U^T G V) Q1), as exactly as a gradient
taken at the truncated weight would be up to that difference.
"""

from __future__ import annotations

import torch

from . import integrators
from . import linalg
from .distributed import all_reduce_mean, world_size
from .groups import rule_key
from .update_rules import change_basis, lift_state, make_rule

# A low-rank group's count of the steps since its last basis step: bookkeeping, saved with the groups (so that a
# resumed run continues its cycle) but no hyperparameter (dlrt.graphs keys its graphs on the step's kind instead).
BASIS_CLOCK = "basis_clock"


def check_basis_every(value, method: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"basis_every must be an integer >= 1 (1: a basis step every batch, the paper's), got {value!r}")
    if value > 1 and method != "adaptive":
        raise ValueError(f"basis_every={value} applies to method='adaptive' (the rank-adaptive step), not to "
                         f"method={method!r}: leave it at 1")


def is_basis_step(group: dict) -> bool:
    """Whether the group's next step is a basis step (truncate, new directions, S-step at the augmented bases), not
    a coefficient step (S and the dense parameters only)."""
    return group[BASIS_CLOCK] % group["basis_every"] == 0


@torch.no_grad()
def truncate_and_augment(step, r1: int, checked_shortcuts: bool, directions) -> None:
    """step: a functional.LayerStep whose svd is the SVD of the layer's current core; r1: its truncated rank. The
    augmented factors are left in step.new_factors.
    `directions(entries)`: functional.directions, the update rules' directions for (state, gradient, group)."""
    state, group = step.state, step.group
    P1, sigma1, Q1 = _truncated_svd(step, r1)
    U1, V1 = step.U @ P1, step.V @ Q1
    grad_K, grad_L = step.grad_U @ Q1, step.grad_V @ P1  # G V1, G^T U1
    grad_S = P1.T @ step.grad_S @ Q1  # U1^T G V1
    _move_states(step, P1, Q1)
    dK, dL = directions([(state["K"], grad_K, group), (state["L"], grad_L, group)])
    count = integrators.augmentation_size(r1, step.out_dim, step.in_dim)
    U_new, V_new = linalg.new_directions_of_many([U1, V1], [dK, dL], [count, count], projected=checked_shortcuts)
    block = step.project_gradient(U_new, V_new)
    if step.edit_scale is not None:
        block = block * step.edit_scale
    step.inputs.clear()
    if world_size() > 1:
        all_reduce_mean([block])
    grad = integrators.augmented_gradient(grad_S, grad_K, grad_L, U_new, V_new, block)
    size = grad.shape[0]
    state["S"] = lift_state(state["S"], size)
    (dS,) = directions([(state["S"], grad, group)])
    # K's state has V's columns, L's U's: the new directions start with none
    state["K"], state["L"] = lift_columns(state["K"], size), lift_columns(state["L"], size)
    core = integrators.gradient_step(integrators.augmented_core(torch.diag(sigma1), size), dS, group["lr"])
    step.new_factors = (torch.cat([U1, U_new], dim=1), core, torch.cat([V1, V_new], dim=1))


def lift_columns(state: dict, size: int) -> dict:
    """A K or L state (rows x r, Adam's masses 1 x r) with zero columns for the new directions, `size` in all; its
    numbers (state_policy='restart' keeps a step count) as they are."""
    return {key: torch.nn.functional.pad(value, (0, size - value.shape[1])) if value.dim() == 2 else value
            for key, value in state.items()}


@torch.no_grad()
def truncate(step, r1: int) -> None:
    """Truncate a layer between basis steps (DLRTOptimizer.truncate: before an evaluation or an export) to rank r1,
    as the next basis step would: step.svd is the SVD of its core; the states move into the new bases, the new
    factors are left in step.new_factors."""
    P1, sigma1, Q1 = _truncated_svd(step, r1)
    step.new_factors = (step.U @ P1, torch.diag(sigma1), step.V @ Q1)
    _move_states(step, P1, Q1)


def _truncated_svd(step, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P1, σ1, Q1: the leading r1 singular vectors and values of the core (its SVD is step.svd)."""
    P, sigma, Qh = step.svd
    return P[:, :r1], sigma[:r1], Qh[:r1].T


def _move_states(step, P1: torch.Tensor, Q1: torch.Tensor) -> None:
    """K's state has V's columns, L's U's, S's both: into the truncated bases U P1, V Q1."""
    state, group = step.state, step.group
    rule, policy = make_rule(*rule_key(group)), group["state_policy"]
    state["K"] = change_basis(state["K"], rule, policy, None, Q1)
    state["L"] = change_basis(state["L"], rule, policy, None, P1)
    state["S"] = change_basis(state["S"], rule, policy, P1, Q1)
