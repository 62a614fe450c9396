"""How a gradient becomes an update direction for K, L or S, and what happens to its state when bases move.

The integrator steps each factor as X1 = X0 - lr * direction. A rule turns gradients into those
directions (plain SGD, heavy-ball momentum as torch.optim.SGD, or Adam as torch.optim.Adam), for many
factors in one call of torch's foreach kernels (on a CPU, per-operation overhead is a good part of a
small network's step), and keeps its state as matrices the shape of the factor. Those matrices are
coordinates in the layer's current bases U, V; after a DLRT step the bases rotate and the rank may
change, so the state has to follow.
The policy says how (`STATE_POLICIES`):

- ``project`` (default): the state is carried into the new bases as the W-space matrix it stands for
  would be: X -> A^T X B with A = U_old^T U_new, B = V_old^T V_new (Adam's second moments with the
  element-wise squares of A and B, which keeps them non-negative and is exact for permutations).
- ``keep``: the state stays at its buffer positions while the bases rotate under it, cut or
  zero-padded when the rank changes. This is what the published code does.
- ``reset``: like ``keep`` while the rank stays, zeroed when the rank changes.
- ``restart``: the published FC code's (TensorFlow; results/ERRATA.md, finding 4): the state starts from zero at
  every basis change (at every step, unless basis_every > 1), as the Adam slots of the new variables that code makes
  for K, L and S in every batch do, while Adam's bias correction runs on at the optimizer's global step count, as
  Keras's does. With Adam each step is then a sign step, lr (1 - beta1) / sqrt(1 - beta2) per entry once the
  correction has died out (`AdamRule.carried_through_restart` says how the count is kept).
"""

from __future__ import annotations

import torch

STATE_POLICIES = ("project", "keep", "reset", "restart")
# The published FC code applies its one Keras Adam three times per batch, to the K, the L and the S gradients
# (T@9bd6e9e, tf_implementation/mnist_DLRA.py:199, 200, 231), so its step count grows by three per batch.
APPLICATIONS_PER_BATCH = 3
RULES = ("sgd", "adam")


class SGDRule:
    """direction = g, or with momentum mu: buf = mu * buf + g; direction = buf (torch.optim.SGD)."""

    def __init__(self, momentum: float = 0.0):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.state_keys = ("momentum",) if momentum else ()

    def init_state(self, like: torch.Tensor, rows_share_state: bool = False) -> dict:
        return {"momentum": torch.zeros_like(like)} if self.momentum else {}

    def directions(self, states: list[dict], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.momentum or not grads:
            return list(grads)
        buffers = [state["momentum"] for state in states]
        torch._foreach_mul_(buffers, self.momentum)
        torch._foreach_add_(buffers, grads)
        return buffers

    def carried_through_restart(self, state: dict) -> dict:
        """The entries a restart keeps (the "restart" policy): none, the momentum starts from zero."""
        return {}

    # entries moved linearly, entries moved as second moments
    linear_entries = ("momentum",)
    square_entries = ()


class AdamRule:
    """torch.optim.Adam's update (no weight decay), with its bias correction kept per entry.

    Adam divides its averages by 1 - beta^t. Here each entry carries that divisor as a "mass"
    (mass = beta * mass + 1 - beta), moved with the state when bases change. A direction that the
    augmentation just added starts at mass 0 and gets a first step like a fresh Adam's, instead of
    the inflated step that a zero second moment with a global step count would give it.

    For K and L, whose rows never change basis, every row has the same mass: it is kept as one row
    (1 x r) that broadcasts, which saves half the work of moving Adam's state.
    """

    state_keys = ("exp_avg", "exp_avg_sq", "mass", "mass_sq")

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-8):
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)!r}")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.beta1, self.beta2 = betas
        self.eps = eps

    def init_state(self, like: torch.Tensor, rows_share_state: bool = False) -> dict:
        """rows_share_state: the factor's rows keep their basis (K, L), so the masses are one row."""
        mass = like.new_zeros(1, like.shape[1]) if rows_share_state else torch.zeros_like(like)
        return {"exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like),
                "mass": mass, "mass_sq": mass.clone()}

    def directions(self, states: list[dict], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if not grads:  # torch's foreach kernels refuse empty lists
            return []
        b1, b2 = self.beta1, self.beta2
        avg, avg_sq, mass, mass_sq = ([state[key] for state in states]
                                      for key in ("exp_avg", "exp_avg_sq", "mass", "mass_sq"))
        torch._foreach_lerp_(avg, grads, 1 - b1)
        torch._foreach_mul_(avg_sq, b2)
        torch._foreach_addcmul_(avg_sq, grads, grads, value=1 - b2)
        torch._foreach_mul_(mass, b1)
        torch._foreach_add_(mass, 1 - b1)
        torch._foreach_mul_(mass_sq, b2)
        torch._foreach_add_(mass_sq, 1 - b2)
        denominators = torch._foreach_div(avg_sq, mass_sq)  # masses broadcast over the rows of K and L
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, self.eps)
        result = torch._foreach_div(avg, mass)
        torch._foreach_div_(result, denominators)
        return result

    def carried_through_restart(self, state: dict) -> dict:
        """The entries a restart keeps (the "restart" policy): the masses, as one number each, moved on to the next
        step's bias correction at Keras's global step count t (its correction is 1 - beta^t, the mass after t steps).

        In the published code the batch's applications are K's (t = 3n - 2 in batch n), L's (3n - 1) and S's (3n),
        and K moves twice: on its gradient, then on its moments in L's application (dlranet.py:481 makes K a new
        variable; mnist_DLRA.py:199-200). The rank-adaptive step (method=adaptive) reads K's and L's steps only
        through their span, [U0, dK] (new_directions_of_many), which neither a positive scale of the step nor K's
        second move (a step of the same signs) changes; so every factor takes S's count, t = 3n, and K moves once.
        A restarted mass, at t = 3n, runs on past the next batch's K and L applications; a state not yet restarted
        took its first step at t = 1 (per-entry masses), where Keras's S step was at 3, so it runs on past those two
        as well: from the second batch on, S's correction is Keras's (tests/test_update_rules.py checks both
        against the published code's Adam).
        """
        skipped = APPLICATIONS_PER_BATCH - 1
        if state["mass"].dim():  # not restarted before: its first step counted 1, not APPLICATIONS_PER_BATCH
            skipped += APPLICATIONS_PER_BATCH - 1
        # the oldest entry's count is the global one; in float64, as float32's rounding of 1 - beta^t near 1 would
        # add up over the run to an error of 1e-5 in the correction (a 0-d tensor does not promote the moments')
        return {key: 1 - beta ** skipped * (1 - state[key].amax().double())
                for key, beta in (("mass", self.beta1), ("mass_sq", self.beta2))}

    linear_entries = ("exp_avg",)
    square_entries = ("exp_avg_sq", "mass", "mass_sq")


def make_rule(name: str, momentum: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    if name == "sgd":
        return SGDRule(momentum)
    if name == "adam":
        return AdamRule(betas, eps)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(RULES)}")


def lift_state(state: dict, size: int) -> dict:
    """Embed an r x r state into the top-left of a size x size one (the augmented basis [U0, Ũ])."""
    return {key: value if not value.dim() else  # a restarted state's masses: one number for every entry
            torch.nn.functional.pad(value, (0, size - value.shape[1], 0, size - value.shape[0]))
            for key, value in state.items()}


def change_basis(state: dict, rule, policy: str, left: torch.Tensor | None, right: torch.Tensor) -> dict:
    """Move a factor's state from old to new coordinates.

    left (old_rows x new_rows, or None when the rows keep their basis) and right (old_cols x new_cols)
    are the overlaps of old and new bases, e.g. right = V_old^T V_new.
    """
    moved = {}
    square_left = None if left is None else left * left
    square_right = right * right
    carried = rule.carried_through_restart(state) if policy == "restart" else {}
    for key, value in state.items():
        if key in carried:
            moved[key] = carried[key]
            continue
        if not value.dim():  # a restarted state's masses (the policy changed since): no coordinates to move
            moved[key] = value
            continue
        old_shape = value.shape
        new_shape = (old_shape[0] if left is None else left.shape[1], right.shape[1])
        if policy == "restart":
            moved[key] = value.new_zeros(new_shape)
        elif policy == "project":
            a, b = (square_left, square_right) if key in rule.square_entries else (left, right)
            moved[key] = (value if a is None else a.T @ value) @ b
        elif policy == "reset" and tuple(new_shape) != tuple(old_shape):
            moved[key] = value.new_zeros(new_shape)
        else:  # keep (and reset at an unchanged rank): same positions, cut or zero-padded
            kept = value.new_zeros(new_shape)
            rows, cols = min(old_shape[0], new_shape[0]), min(old_shape[1], new_shape[1])
            kept[:rows, :cols] = value[:rows, :cols]
            moved[key] = kept
    return moved
