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

import contextlib

import torch


def k_step(U0, S0, dK, lr):
    """K1 = U0 S0 - lr dK."""
    return U0 @ S0 - lr * dK


def l_step(V0, S0, dL, lr):
    """L1 = V0 S0^T - lr dL."""
    return V0 @ S0.T - lr * dL


def new_directions(U0: torch.Tensor, dK: torch.Tensor, count: int, projected: bool = False) -> torch.Tensor:
    """Ũ: `count` orthonormal columns orthogonal to U0 such that span[U0, Ũ] ⊇ span[U0, K1], for the
    K-step K1 = U0 S0 - lr dK of any lr (span[U0, K1] ⊆ span[U0, dK]; likewise for V0 and dL).

    The QR of [U0, dK] starts with ±U0 (U0 is orthonormal), so its next columns are the new ones.

    projected=True gets the same span from a QR of half the width (on a CPU 0.2 against 0.4 ms for a
    500 x 50 factor, 250 against 430 ms for 5120 x 640): project U0 out of dK, factorise X = Q R and
    project U0 out of Q; X = Q R and X ⟂ U0 keep X inside the span of the projected Q. Column j of Q
    leans on U0 by about eps ‖dK‖ / |R_jj|. Where all |R_jj| > √eps ‖dK‖, the projected Q is
    orthonormal to eps. Otherwise dK has fewer than `count` directions outside span U0 (a batch
    smaller than the rank bounds the gradient's rank; a zero step has none), and Householder filled
    the deficient columns with directions of its own choosing, which may lean on U0: those few are
    orthogonalised against U0 and the good columns, and orthonormalised by a QR of their own. Only
    if one of them lay mostly inside that span is the full QR taken. The checks cost a host sync per
    call: free on a CPU.
    """
    r = U0.shape[1]
    dK = dK[:, :count]
    if projected and count > 0:
        Q, R = torch.linalg.qr(_project_out(U0, dK))
        Q = _project_out(U0, Q)
        tolerance = torch.finfo(dK.dtype).eps ** 0.5 * torch.linalg.matrix_norm(dK)
        deficient = R.diagonal().abs() <= tolerance
        if not bool(deficient.any()):
            return Q
        # Q's good columns stay where they are; the filled ones are replaced in place (no column copies:
        # at 5120 x 640 gathering columns costs as much as a matmul)
        filled_at = deficient.nonzero().squeeze(1)
        filled = Q[:, filled_at]
        for _ in range(2):  # twice is enough
            on_good = (Q.T @ filled).index_fill_(0, filled_at, 0)  # the good columns' share only
            filled = torch.addmm(_project_out(U0, filled), Q, on_good, alpha=-1)
        filled, R = torch.linalg.qr(filled)
        if bool((R.diagonal().abs() > 0.1).all()):  # then they lean on U0 and the rest by at most ~10 eps
            return Q.index_copy_(1, filled_at, filled)
    Q, _ = torch.linalg.qr(torch.cat([U0, dK], dim=1))
    return Q[:, r : r + count]


def _project_out(U0: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """X - U0 U0^T X, the subtraction fused into the product."""
    return torch.addmm(X, U0, U0.T @ X, alpha=-1)


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


def fixed_rank_basis(U0, S0, V0, K1, L1):
    """Fixed-rank KLS basis update: U1 = orth(K1), V1 = orth(L1), S̃ = (U1^T U0) S0 (V0^T V1).

    Returns U1, S̃, V1 and the overlaps U0^T U1 and V0^T V1, which also move the optimizer's states:
    each costs n r^2, as much as the QR's own products, so they are formed once.
    """
    U1, _ = torch.linalg.qr(K1)
    V1, _ = torch.linalg.qr(L1)
    U_overlap, V_overlap = U0.T @ U1, V0.T @ V1
    return U1, U_overlap.T @ S0 @ V_overlap, V1, U_overlap, V_overlap


def svd(S1: torch.Tensor):
    """SVD of an augmented core; in float64 when the float32 solver does not converge (seen with
    hundreds of near-zero singular values at rank 640)."""
    try:
        return torch.linalg.svd(S1)
    except torch.linalg.LinAlgError:
        P, sigma, Qh = torch.linalg.svd(S1.double())
        return P.to(S1.dtype), sigma.to(S1.dtype), Qh.to(S1.dtype)


def svds_on_host(cores: list[torch.Tensor], decompose=svd) -> tuple[list[tuple], list[torch.Tensor]]:
    """`decompose` (svd or gram_svd) of square cores on any device, taken on the host: the cores come over
    in one copy (a host sync), LAPACK runs on one thread, and the factors go back in one copy. Returns the
    factors (P, σ, Qh) on the cores' device, and the σ on the host.

    On a GPU, torch's SVD synchronises twice per call to check its result; small cores cost LAPACK less."""
    device, sizes = cores[0].device, [core.shape[0] for core in cores]
    host = torch.cat([core.reshape(-1) for core in cores]).cpu().split([k * k for k in sizes])
    # One thread for all of it: matrices this small lose time to more. With the FC net's cores an H100's
    # 16-thread host burnt ten times the step's wall time in CPU time while the copy into pinned memory ran
    # outside this block (threads spinning after a parallel copy, the likely cause).
    with _one_thread():
        found = [decompose(core.view(k, k)) for core, k in zip(host, sizes)]
        packed = torch.cat([t.reshape(-1) for factors in found for t in factors])
        if device.type == "cuda":
            packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    shapes = [t.shape for factors in found for t in factors]
    pieces = iter(t.view(shape) for t, shape in zip(packed.split([shape.numel() for shape in shapes]), shapes))
    return [(next(pieces), next(pieces), next(pieces)) for _ in found], [sigma for _, sigma, _ in found]


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Singular vectors from the Gram matrix are accurate to about eps64 (σ_1 / σ_k)^2: keep σ_k above this.
GRAM_SVD_MIN_RATIO = 1e-4


def gram_svd(S1: torch.Tensor):
    """The SVD of S1 from the eigendecomposition of S1 S1^T in float64: S1 S1^T = P diag(σ^2) P^T and
    Q = S1^T P diag(1/σ). Faster than torch.linalg.svd on a CPU (0.72 against 0.87 ms at 106 x 106),
    exact enough only for the singular triplets with σ_k ≥ GRAM_SVD_MIN_RATIO σ_1: check the kept ones
    with gram_svd_accurate. Columns of Q for σ_k = 0 are left at zero."""
    A = S1.double()
    lam, P = torch.linalg.eigh(A @ A.T)
    lam, P = lam.flip(0), P.flip(1)  # eigh sorts ascending
    sigma = lam.clamp_min(0).sqrt()
    Q = (A.T @ P) / torch.where(sigma > 0, sigma, 1)
    return P.to(S1.dtype), sigma.to(S1.dtype), Q.T.to(S1.dtype)


def gram_svd_accurate(sigma: torch.Tensor, rank: int) -> bool:
    """Whether gram_svd's leading `rank` triplets are as good as an SVD's."""
    return rank == 0 or bool(sigma[rank - 1] >= GRAM_SVD_MIN_RATIO * sigma[0])


def truncation_ranks(sigmas: list[torch.Tensor], tau: float, relative: bool,
                     r_min: torch.Tensor, r_max: torch.Tensor) -> list[int]:
    """truncation_rank_tensor as a list: one host synchronisation for all layers."""
    return truncation_rank_tensor(sigmas, tau, relative, r_min, r_max).tolist()


def truncation_rank_tensor(sigmas: list[torch.Tensor], tau: float, relative: bool,
                           r_min: torch.Tensor, r_max: torch.Tensor) -> torch.Tensor:
    """New ranks for many layers at once: for each descending σ (length p), the smallest r1 with

        ‖(σ_{r1+1}, …, σ_p)‖_2 ≤ ϑ ‖σ‖_2   (relative)   or   ≤ ϑ   (absolute),

    the tail including σ_p, and r1 = p when no smaller cut qualifies (always when ϑ = 0); then clamped
    to [r_min, min(r_max, p)]. One vectorised pass for all layers, left on the device.
    """
    # made on the device, not copied from a Python list: a copy from host memory cannot be in a CUDA graph
    sizes = torch.stack([torch.full((), len(s), device=r_min.device) for s in sigmas])
    padded = torch.nn.utils.rnn.pad_sequence(sigmas, batch_first=True)  # zeros do not change tails
    # tails[:, k] = ‖σ_{k+1..p}‖ = what is dropped when keeping k; non-increasing in k
    tails = padded.square().flip(1).cumsum(1).flip(1).sqrt()
    if tau == 0:
        ranks = sizes
    else:
        threshold = tau * padded.norm(dim=1, keepdim=True) if relative else torch.full_like(padded[:, :1], tau)
        ranks = (tails > threshold).sum(1)  # = the first k whose tail qualifies
    return torch.minimum(torch.maximum(ranks, r_min), torch.minimum(r_max, sizes))
