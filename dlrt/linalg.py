"""How the step's factorisations are computed: the QRs of tall factors, the SVD of the cores, and where those
run. The formulas that use them are in dlrt.integrators.

Two CPU shortcuts check their own accuracy, which costs a host sync per call (free on a CPU, slower than the
plain calls on a GPU and impossible inside a CUDA graph), so a caller chooses them explicitly (`checked`):
the projected QR of new_directions, and Cholesky-QR2 for large tall matrices (`tall_qr`).

The cores' SVD is torch.linalg.svd everywhere. Its float64 Gram-matrix variant (an eigendecomposition of S S^T),
which an earlier CPU path took, measured no faster at one thread (0.91-1.14x over 2r = 40-1280) and held 3.3 times
the memory: at rank 640 the whole step's peak was inside its eigh (results/bench/memory.txt, issue 18).
"""

from __future__ import annotations

import contextlib

import torch


def checked_shortcuts_by_default(factor: torch.Tensor) -> bool:
    """Whether the checked shortcuts pay on the factor's device: on a CPU yes; on a GPU the plain calls were faster
    (results/bench/gpu/linalg.txt), and their checks could not be held by a CUDA graph."""
    return factor.device.type == "cpu"


# Cholesky-QR2 pays where its Gram matrix and triangular solves (GEMM speed) beat Householder's geqrf + orgqr: on
# one CPU thread, float32, it won 1.2-1.9x at n = 5120 rows for k >= 56 columns, 1.0-1.5x at n = 2048 for
# 56 <= k <= 320, and lost at n <= 800 for every k (0.33-0.77x). Measured by dlrt-bench --suite linalg's qr rows
# and, in more sizes, for issue 18 (its note gives the table). On a GPU it is not measured yet: Householder there.
CHOLESKY_QR_MIN_ROWS, CHOLESKY_QR_MIN_COLUMNS, CHOLESKY_QR_MIN_ASPECT = 2048, 56, 4
# Pass 1 is accepted when ||Q1^T Q1 - I||_F <= this: then κ(Q1)^2 <= 3 and the second pass leaves Q orthonormal to
# a few u. Failing inputs (κ(X) above ~3e3 in float32, a rank-deficient X) go to Householder.
CHOLESKY_QR_GATE = 0.5
GRAM_BLOCK = 128  # wide Gram matrices from their upper block triangle: half the flops (5120 x 640: 16 against 26 ms)


def tall_qr(X: torch.Tensor, checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, R of a tall X (n >= k) with orthonormal Q: Cholesky-QR2 where it is faster and `checked` (its accuracy
    check reads a value on the host), Householder (torch.linalg.qr) otherwise or where the check fails."""
    n, k = X.shape
    if checked and n >= CHOLESKY_QR_MIN_ROWS and k >= CHOLESKY_QR_MIN_COLUMNS and n >= CHOLESKY_QR_MIN_ASPECT * k:
        found = cholesky_qr2(X)
        if found is not None:
            return found
    return torch.linalg.qr(X)


def cholesky_qr2(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cholesky-QR2 (Yamamoto et al. 2015): R1 = chol(X^T X), Q1 = X R1^-1, the same once more on Q1, R = R2 R1.
    None where the first Cholesky breaks down or Q1 is too far from orthonormal for the second pass to repair."""
    R1, info = torch.linalg.cholesky_ex(_gram(X), upper=True)
    if int(info) != 0:
        return None
    Q1 = _right_solve(X, R1)
    G = _gram(Q1)
    if float(torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device))) > CHOLESKY_QR_GATE:
        return None
    R2, info = torch.linalg.cholesky_ex(G, upper=True)
    if int(info) != 0:
        return None
    return _right_solve(Q1, R2), R2 @ R1


def _gram(X: torch.Tensor) -> torch.Tensor:
    """X^T X; for wide X from its upper block triangle (a Gram matrix is symmetric)."""
    k = X.shape[1]
    if k < 2 * GRAM_BLOCK:
        return X.T @ X
    G = X.new_empty(k, k)
    for i in range(0, k, GRAM_BLOCK):
        j = i + GRAM_BLOCK
        block = X[:, i:j].T @ X[:, i:]
        G[i:j, i:] = block
        G[j:, i:j] = block[:, GRAM_BLOCK:].T
    return G


def _right_solve(X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X R^-1 for upper triangular R, as (R^T \\ X^T)^T: MKL's left-sided lower solve is about twice as fast as the
    right-sided one at 5120 x 640."""
    return torch.linalg.solve_triangular(R.T, X.T, upper=False).T


def new_directions(U0: torch.Tensor, dK: torch.Tensor, count: int, projected: bool = False) -> torch.Tensor:
    """Ũ: `count` orthonormal columns orthogonal to U0 such that span[U0, Ũ] ⊇ span[U0, K1], for the
    K-step K1 = U0 S0 - lr dK of any lr (span[U0, K1] ⊆ span[U0, dK]; likewise for V0 and dL).

    The QR of [U0, dK] starts with ±U0 (U0 is orthonormal), so its next columns are the new ones.

    projected=True gets the same span from a QR of half the width (on a CPU 0.2 against 0.4 ms for a
    500 x 50 factor, 250 against 430 ms for 5120 x 640), by tall_qr: project U0 out of dK, factorise X = Q R and
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
        Q, R = tall_qr(_project_out(U0, dK), checked=True)
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


def new_directions_of_many(bases: list[torch.Tensor], directions: list[torch.Tensor], counts: list[int],
                           projected: bool = False) -> list[torch.Tensor]:
    """new_directions for many factors. Without the projected shortcut, the QRs of same-shaped [U0, dK] are one
    batched call: on a GPU one launch (and one host check) instead of one per factor; on a CPU LAPACK loops over the
    batch, the same results."""
    if projected:
        return [new_directions(U0, dK, count, projected=True) for U0, dK, count in zip(bases, directions, counts)]
    found: list[torch.Tensor | None] = [None] * len(bases)
    for indices in _same_shapes([(U0.shape, count) for U0, count in zip(bases, counts)]):
        r, count = bases[indices[0]].shape[1], counts[indices[0]]
        Q, _ = torch.linalg.qr(torch.stack([torch.cat([bases[i], directions[i][:, :count]], dim=1) for i in indices]))
        for Q_i, i in zip(Q, indices):
            found[i] = Q_i[:, r: r + count]
    return found


def _same_shapes(keys: list) -> list[list[int]]:
    """The indices of equal keys, grouped, in order of first appearance."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _project_out(U0: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """X - U0 U0^T X, the subtraction fused into the product."""
    return torch.addmm(X, U0, U0.T @ X, alpha=-1)


def svd(S1: torch.Tensor):
    """SVD of an augmented core (or a batch of them); in float64 when the float32 solver does not converge (seen
    with hundreds of near-zero singular values at rank 640)."""
    try:
        return torch.linalg.svd(S1)
    except torch.linalg.LinAlgError:
        P, sigma, Qh = torch.linalg.svd(S1.double())
        return P.to(S1.dtype), sigma.to(S1.dtype), Qh.to(S1.dtype)


def svds(cores: list[torch.Tensor]) -> list[tuple]:
    """svd of each core, those of the same size in one batched call (one launch on a GPU)."""
    found: list[tuple | None] = [None] * len(cores)
    for indices in _same_shapes([core.shape for core in cores]):
        if len(indices) == 1:
            found[indices[0]] = svd(cores[indices[0]])
            continue
        for i, P, sigma, Qh in zip(indices, *svd(torch.stack([cores[i] for i in indices]))):
            found[i] = (P, sigma, Qh)
    return found


def svds_on_host(cores: list[torch.Tensor]) -> tuple[list[tuple], list[torch.Tensor]]:
    """`svd` of each square core, on any device, taken on the host: the cores come over
    in one copy (a host sync), LAPACK runs on one thread, and the factors go back in one copy. Returns the
    factors (P, σ, Qh) on the cores' device, and the σ on the host.

    On a GPU, torch's SVD synchronises twice per call to check its result; small cores cost LAPACK less."""
    device, sizes = cores[0].device, [core.shape[0] for core in cores]
    host = torch.cat([core.reshape(-1) for core in cores]).cpu().split([k * k for k in sizes])
    # One thread for all of it: matrices this small lose time to more. With the FC net's cores an H100's
    # 16-thread host burnt ten times the step's wall time in CPU time while the copy into pinned memory ran
    # outside this block (threads spinning after a parallel copy, the likely cause).
    with torch_threads(1):
        found = [svd(core.view(k, k)) for core, k in zip(host, sizes)]
        packed = torch.cat([t.reshape(-1) for factors in found for t in factors])
        if device.type == "cuda":
            packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    shapes = [t.shape for factors in found for t in factors]
    pieces = iter(t.view(shape) for t, shape in zip(packed.split([shape.numel() for shape in shapes]), shapes))
    return [(next(pieces), next(pieces), next(pieces)) for _ in found], [sigma for _, sigma, _ in found]


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's thread count inside the block, restored after it (None: unchanged)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
