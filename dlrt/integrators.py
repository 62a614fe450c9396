"""The mathematics of one DLRT step (PAPER.md §1), on plain tensors.

Each formula lives in exactly one function here; dlrt.functional feeds them, and dlrt.linalg says how the
factorisations inside them are computed. Notation: a layer's
weight is W0 = U0 S0 V0^T (n x m, rank r), G = dL/dW at W0, lr the learning rate, and dK, dL, dS the
update directions that an update rule made from the gradients G V0, G^T U0 and U0^T G V0.

The augmented bases are built as Û = [U0, Ũ] with Ũ orthonormal and orthogonal to U0. Their span is
that of orth([K1, U0]) in the paper, and everything the step computes (Û S V̂^T, the truncated W) is
independent of the basis chosen for that span; with U0 first, S̃ = Û^T U0 S0 V0^T V̂ is exactly
[[S0, 0], [0, 0]] and the old-to-new overlaps are slices, not products.
"""

from __future__ import annotations

import torch


def gradient_step(X0: torch.Tensor, dX: torch.Tensor, lr: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """X1 = X0 - lr dX: the S-step (at whatever bases S0 is written in), and vanilla's steps of U and V; into `out`
    (X0 itself for a step in place) when given."""
    return torch.sub(X0, dX, alpha=lr, out=out)


def k_step(U0, S0, dK, lr):
    """K1 = U0 S0 - lr dK, in one product."""
    return torch.addmm(dK, U0, S0, beta=-lr)


def l_step(V0, S0, dL, lr):
    """L1 = V0 S0^T - lr dL, in one product."""
    return torch.addmm(dL, V0, S0.T, beta=-lr)


def augmentation_size(rank: int, n: int, m: int) -> int:
    """How many new directions fit: r, unless the layer has fewer dimensions left."""
    return max(0, min(rank, n - rank, m - rank))


def augmented_core(S0: torch.Tensor, size: int) -> torch.Tensor:
    """S̃ = Û^T U0 S0 V0^T V̂ = [[S0, 0], [0, 0]] for Û = [U0, Ũ], V̂ = [V0, Ṽ]."""
    r = S0.shape[0]
    return torch.nn.functional.pad(S0, (0, size - r, 0, size - r))


def augmented_gradient(grad_S, grad_K, grad_L, U_new, V_new, grad_new_new):
    """Û^T G V̂ in blocks, from gradients taken at W0 (one backward pass):

    [[U0^T G V0, U0^T G Ṽ], [Ũ^T G V0, Ũ^T G Ṽ]] with U0^T G Ṽ = (G^T U0)^T Ṽ and Ũ^T G V0 = Ũ^T (G V0).
    """
    top = torch.cat([grad_S, grad_L.T @ V_new], dim=1)
    bottom = torch.cat([U_new.T @ grad_K, grad_new_new], dim=1)
    return torch.cat([top, bottom], dim=0)


def parallel_core(S_bar, dK, dL, U_new, V_new, lr):
    """The parallel integrator's augmented core [[S̄, L1^T Ṽ], [Ũ^T K1, 0]].

    With Ṽ ⟂ V0 and Ũ ⟂ U0: L1^T Ṽ = -lr dL^T Ṽ and Ũ^T K1 = -lr Ũ^T dK.
    """
    top = torch.cat([S_bar, -lr * (dL.T @ V_new)], dim=1)
    bottom = torch.cat([-lr * (U_new.T @ dK), S_bar.new_zeros(U_new.shape[1], V_new.shape[1])], dim=1)
    return torch.cat([top, bottom], dim=0)


def rotate(U0: torch.Tensor, U_new: torch.Tensor, P1: torch.Tensor) -> torch.Tensor:
    """[U0, Ũ] P1, the truncated new basis, without forming [U0, Ũ]."""
    r = U0.shape[1]
    return torch.addmm(U0 @ P1[:r], U_new, P1[r:])


def fixed_rank_basis(U0, S0, V0, K1, L1, qr=torch.linalg.qr):
    """Fixed-rank KLS basis update: U1 = orth(K1), V1 = orth(L1), S̃ = (U1^T U0) S0 (V0^T V1).

    Returns U1, S̃, V1 and the overlaps U0^T U1 and V0^T V1, which also move the optimizer's states:
    each costs n r^2, as much as the QR's own products, so they are formed once. `qr`: how orth is taken.
    """
    U1, _ = qr(K1)
    V1, _ = qr(L1)
    U_overlap, V_overlap = U0.T @ U1, V0.T @ V1
    return U1, U_overlap.T @ S0 @ V_overlap, V1, U_overlap, V_overlap


def truncation_rank_tensor(sigmas: list[torch.Tensor], tau, relative, r_min: torch.Tensor,
                           r_max: torch.Tensor) -> torch.Tensor:
    """New ranks for many layers at once: for each descending σ (length p), the smallest r1 with

        ‖(σ_{r1+1}, …, σ_p)‖_2 ≤ ϑ ‖σ‖_2   (relative)   or   ≤ ϑ   (absolute),

    the tail including σ_p, and r1 = p when no smaller cut qualifies (always when ϑ = 0); then clamped
    to [r_min, min(r_max, p)]. `tau` and `relative` are one value for all layers or a tensor with one per
    layer. One vectorised pass for all layers, left on the device.
    """
    # made on the device, not copied from a Python list: a copy from host memory cannot be in a CUDA graph
    sizes = torch.stack([torch.full((), len(s), device=r_min.device) for s in sigmas])
    padded = torch.nn.utils.rnn.pad_sequence(sigmas, batch_first=True)  # zeros do not change tails
    # tails[:, k] = ‖σ_{k+1..p}‖ = what is dropped when keeping k; non-increasing in k
    tails = padded.square().flip(1).cumsum(1).flip(1).sqrt()
    if isinstance(tau, (int, float)) and tau == 0:
        ranks = sizes
    else:
        tau = torch.as_tensor(tau, dtype=padded.dtype, device=padded.device).reshape(-1, 1)
        relative = torch.as_tensor(relative, device=padded.device).reshape(-1, 1)
        threshold = torch.where(relative, tau * padded.norm(dim=1, keepdim=True), tau)
        cut = (tails > threshold).sum(1)  # = the first k whose tail qualifies
        ranks = torch.where(tau.squeeze(1) == 0, sizes, cut)
    return torch.minimum(torch.maximum(ranks, r_min), torch.minimum(r_max, sizes))
