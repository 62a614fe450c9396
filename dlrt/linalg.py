"""How the step's factorisations are computed: the QR that finds new directions, the SVD of the cores, and
where those run. The formulas that use them are in dlrt.integrators.

Two CPU shortcuts check their own accuracy, which costs a host sync per call (free on a CPU, slower than the
plain calls on a GPU and impossible inside a CUDA graph), so a caller chooses them explicitly (`checked`):
the projected QR of new_directions, and gram_svd.
"""

from __future__ import annotations

import contextlib

import torch


def checked_shortcuts_by_default(factor: torch.Tensor) -> bool:
    """Whether the checked shortcuts pay on the factor's device: on a CPU yes; on a GPU the plain calls were faster
    (results/bench/gpu/linalg.txt), and their checks could not be held by a CUDA graph."""
    return factor.device.type == "cpu"


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


