"""dlrt-run with the two defects of the published rank-adaptive truncation (optimizer_KLS/dlrt_optimizer.py:40-226,
COMPiLELab/DLRT-Net; ERRATA finding 5), and nothing else changed, to see how much of the LeNet5 offset between our
table and the paper's they explain (issue 24, item 3):

- rotation: after the SVD Ŝ = P Σ Qᵀ of the augmented core, V is rotated with the first r1 *rows* of Q
  (`V_hat @ v2[:, :rmax]`, where torch's svd returns v2 = Qᵀ), not its first r1 columns. Which wrong basis that
  gives depends on the augmented bases, so it is taken in theirs: Û = qr([K1, U0]), V̂ = qr([L1, V0]) (their
  `K_postprocess_step`, `L_postprocess_step`), not ours, [U0, Ũ] and [V0, Ṽ]. Both span the same spaces, so
  the core, its singular values and the step without the defect are the same;
- tail: the truncation tail leaves out the last singular value σ_2r (`norm(d[j:2 rmax - 1])`), compares with `<`,
  and keeps the old rank when no cut qualifies.

    python results/diagnostics/lenet5_published_defects/with_defects.py experiment=lenet5_mnist tau=0.13 seed=0 \
        out_dir=results/diagnostics/lenet5_published_defects/runs threads=1 progress=false

The defects are put in by replacing two functions of dlrt for this process only (the library has no such option):
`put_in_defects()`. Their LeNet5 trains with plain SGD, and so must this (its K- and L-steps read the gradients as
they are). A run folder records its command as `python -m dlrt.experiments ...`: the folder's place says it ran
with defects. `same_start_check.py` beside it runs their code and this from the same start on the same batches: it
takes their step, but its runs blow up where theirs train (README), so they cannot stand for their code's runs.
"""

import torch

import dlrt.functional
import dlrt.integrators

DEFECTS = ("rotation", "tail")
correct_finish = dlrt.functional._RankAdaptive.finish


def their_bases(step) -> tuple[torch.Tensor, torch.Tensor]:
    """Their augmented bases qr([K1, U0]), qr([L1, V0]) expressed in ours: R_U = Ûᵀ Û_theirs, R_V likewise."""
    group = step.group
    if group["optimizer"] != "sgd" or group["momentum"]:
        raise ValueError("with_defects.py reproduces the published LeNet5 step, plain SGD: set optim.name=sgd and "
                         "no momentum")
    lr, U0, S0, V0 = group["lr"], step.U, step.S, step.V
    K1 = dlrt.integrators.k_step(U0, S0, step.grad_U, lr)
    L1 = dlrt.integrators.l_step(V0, S0, step.grad_V, lr)
    U_new, V_new = step.new_bases
    if U_new.shape[1] != U0.shape[1] or V_new.shape[1] != V0.shape[1]:
        raise ValueError(f"their step needs 2r directions; a layer of rank {U0.shape[1]} has only "
                         f"{U0.shape[1] + U_new.shape[1]}")
    ours_U, ours_V = torch.cat([U0, U_new], dim=1), torch.cat([V0, V_new], dim=1)
    theirs_U = torch.linalg.qr(torch.cat([K1, U0], dim=1)).Q
    theirs_V = torch.linalg.qr(torch.cat([L1, V0], dim=1)).Q
    return ours_U.T @ theirs_U, ours_V.T @ theirs_V


def finish_with_the_rotation_defect(self, plan, new_ranks):
    """Each step's SVD replaced by their core's, Û_tᵀ Ŵ V̂_t = R_Uᵀ Ŝ R_V = P_t Σ Qh_t, written in our bases so that
    the correct finish takes U1 = Û R_U P_t[:, :r1] (theirs, Û_t P_t[:, :r1]) and V1 = V̂ R_V Qh_t[:, :r1] (theirs,
    V̂_t v2[:, :r1]): it reads Q1 = Qh[:r1]ᵀ, so Qh = (R_V Qh_t)ᵀ."""
    for step in plan.steps:
        if step.in_cycle:
            raise ValueError("with_defects.py has no basis_every cycles: their code has none")
        R_U, R_V = their_bases(step)
        P_t, sigma, Qh_t = torch.linalg.svd(R_U.T @ step.core @ R_V)
        step.svd = (R_U @ P_t, sigma, (R_V @ Qh_t).T)
    correct_finish(self, plan, new_ranks)


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


def put_in_defects() -> None:
    dlrt.functional._RankAdaptive.finish = finish_with_the_rotation_defect
    dlrt.integrators.truncation_rank_tensor = ranks_with_the_tail_defect


def main() -> None:
    put_in_defects()
    from dlrt.experiments.cli import run

    run()


if __name__ == "__main__":
    main()
