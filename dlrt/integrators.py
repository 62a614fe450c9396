"""The mathematics of one DLRT step (PAPER.md §1), on plain tensors.

Each formula lives in exactly one function here; DLRTOptimizer only feeds them. Notation: a layer's
weight is W0 = U0 S0 V0^T (n x m, rank r), G = dL/dW at W0, lr the learning rate, and dK, dL, dS the
update directions that an update rule made from the gradients G V0, G^T U0 and U0^T G V0.

The augmented bases are built as Û = [U0, Ũ] with Ũ orthonormal and orthogonal to U0. Their span is
that of orth([K1, U0]) in the paper, and everything the step computes (Û S V̂^T, the truncated W) is
independent of the basis chosen for that span; with U0 first, S̃ = Û^T U0 S0 V0^T V̂ is exactly
[[S0, 0], [0, 0]] and the old-to-new overlaps are slices, not products.
"""

from __future__ import annotations

import torch


def k_step(U0, S0, dK, lr):
    """K1 = U0 S0 - lr dK."""
    return U0 @ S0 - lr * dK


def l_step(V0, S0, dL, lr):
    """L1 = V0 S0^T - lr dL."""
    return V0 @ S0.T - lr * dL


def new_directions(U0: torch.Tensor, K1: torch.Tensor, count: int) -> torch.Tensor:
    """Ũ: `count` orthonormal columns orthogonal to U0 such that span[U0, Ũ] ⊇ span[U0, K1].

    The QR of [U0, K1] starts with ±U0 (U0 is orthonormal), so its next columns are the new ones.
    """
    r = U0.shape[1]
    Q, _ = torch.linalg.qr(torch.cat([U0, K1], dim=1))
    return Q[:, r : r + count]


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


def fixed_rank_basis(U0, S0, V0, K1, L1):
    """Fixed-rank KLS basis update: U1 = orth(K1), V1 = orth(L1), S̃ = (U1^T U0) S0 (V0^T V1)."""
    U1, _ = torch.linalg.qr(K1)
    V1, _ = torch.linalg.qr(L1)
    return U1, (U1.T @ U0) @ S0 @ (V0.T @ V1), V1


def svd(S1: torch.Tensor):
    """SVD of an augmented core; in float64 when the float32 solver does not converge (seen with
    hundreds of near-zero singular values at rank 640)."""
    try:
        return torch.linalg.svd(S1)
    except torch.linalg.LinAlgError:
        P, sigma, Qh = torch.linalg.svd(S1.double())
        return P.to(S1.dtype), sigma.to(S1.dtype), Qh.to(S1.dtype)


def truncation_ranks(sigmas: list[torch.Tensor], tau: float, relative: bool,
                     r_min: torch.Tensor, r_max: torch.Tensor) -> list[int]:
    """New ranks for many layers at once: for each descending σ (length p), the smallest r1 with

        ‖(σ_{r1+1}, …, σ_p)‖_2 ≤ ϑ ‖σ‖_2   (relative)   or   ≤ ϑ   (absolute),

    the tail including σ_p, and r1 = p when no smaller cut qualifies (always when ϑ = 0); then clamped
    to [r_min, min(r_max, p)]. One vectorised pass and one host synchronisation for all layers.
    """
    sizes = torch.tensor([len(s) for s in sigmas], device=r_min.device)
    padded = torch.nn.utils.rnn.pad_sequence(sigmas, batch_first=True)  # zeros do not change tails
    # tails[:, k] = ‖σ_{k+1..p}‖ = what is dropped when keeping k; non-increasing in k
    tails = padded.square().flip(1).cumsum(1).flip(1).sqrt()
    if tau == 0:
        ranks = sizes
    else:
        threshold = tau * padded.norm(dim=1, keepdim=True) if relative else torch.full_like(padded[:, :1], tau)
        ranks = (tails > threshold).sum(1)  # = the first k whose tail qualifies
    ranks = torch.minimum(torch.maximum(ranks, r_min), torch.minimum(r_max, sizes))
    return ranks.tolist()
