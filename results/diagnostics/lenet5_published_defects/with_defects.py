"""dlrt-run with the two defects of the published rank-adaptive truncation (optimizer_KLS/dlrt_optimizer.py:193-226,
COMPiLELab/DLRT-Net; ERRATA finding 5), and nothing else changed, to see how much of the LeNet5 offset between our
table and the paper's they explain (issue 24, item 3):

- rotation: V is rotated with the first r1 *rows* of Q (`V_hat @ v2[:, :rmax]`, where torch's svd returns
  v2 = Qᵀ), not its first r1 columns;
- tail: the truncation tail leaves out the last singular value σ_2r (`norm(d[j:2 rmax - 1])`), compares with `<`,
  and keeps the old rank when no cut qualifies.

    python results/diagnostics/lenet5_published_defects/with_defects.py experiment=lenet5_mnist tau=0.13 seed=0 \
        out_dir=results/diagnostics/lenet5_published_defects/runs threads=1 progress=false

The defects are put in by replacing two functions of dlrt for this process only (the library has no such option).
A run folder records its command as `python -m dlrt.experiments ...`: the folder's place says it ran with defects.
"""

import torch

import dlrt.integrators
import dlrt.linalg

DEFECTS = ("rotation", "tail")
correct_svds = dlrt.linalg.svds


def svds_with_the_rotation_defect(cores):
    """The cores' SVDs with Qh replaced by Qhᵀ, so that the step's Q1 = Qh[:r1]ᵀ becomes theirs, Qh[:, :r1]: the
    first r1 rows of Q. The rank decision reads σ only; the other uses of Qh (a basis_every cycle) are not run."""
    return [(P, sigma, Qh.T) for P, sigma, Qh in correct_svds(cores)]


def ranks_with_the_tail_defect(sigmas, tau, relative, r_min, r_max):
    """Their rank rule, per layer: the smallest j with ‖(σ_j, ..., σ_{p-1})‖ < tol, σ_p left out (1-based), the old
    rank p/2 when none qualifies, then clamped to [r_min, r_max]."""
    ranks = []
    for i, sigma in enumerate(sigmas):
        p = sigma.shape[0]
        tol = tau[i] * torch.linalg.norm(sigma) if relative[i] else tau[i]
        rank = p // 2
        for j in range(p - 1):
            if torch.linalg.norm(sigma[j:p - 1]) < tol:
                rank = j
                break
        ranks.append(min(max(rank, int(r_min[i])), int(r_max[i]), p))
    return torch.tensor(ranks, device=r_min.device)


def main() -> None:
    dlrt.linalg.svds = svds_with_the_rotation_defect
    dlrt.integrators.truncation_rank_tensor = ranks_with_the_tail_defect
    from dlrt.experiments.cli import run

    run()


if __name__ == "__main__":
    main()
