"""with_defects.py (results/diagnostics/lenet5_published_defects): dlrt-run with the published truncation's two
defects put in. The defects must be theirs, line for line, and nothing else may change."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dlrt import DLRTOptimizer, low_rank_layers
import dlrt.functional
import dlrt.integrators

from helpers import QUICK, batch_for, python, seeded, small_mlp

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "diagnostics" / "lenet5_published_defects" / "with_defects.py"
spec = importlib.util.spec_from_file_location("with_defects", SCRIPT)
with_defects = importlib.util.module_from_spec(spec)
spec.loader.exec_module(with_defects)


def their_rank(d: torch.Tensor, theta: float, rmax_layer: int) -> int:
    """optimizer_KLS/dlrt_optimizer.py:210-221 (COMPiLELab/DLRT-Net), transcribed."""
    tol = theta * torch.linalg.norm(d)
    rmax = int(d.shape[0] // 2)
    for j in range(0, 2 * rmax - 1):
        tmp = torch.linalg.norm(d[j:2 * rmax - 1])
        if tmp < tol:
            rmax = j
            break
    rmax = min([rmax, rmax_layer])
    return max([rmax, 2])


def test_the_tail_defect_is_their_rank_rule():
    g = torch.Generator().manual_seed(0)
    sigmas = [torch.sort(torch.rand(2 * r, generator=g, dtype=torch.float64) ** 4, descending=True).values
              for r in (3, 5, 8, 20)]
    for theta in (0.0, 0.05, 0.15, 0.4):
        n = len(sigmas)
        found = with_defects.ranks_with_the_tail_defect(
            sigmas, torch.full((n,), theta, dtype=torch.float64), torch.ones(n, dtype=torch.bool),
            torch.full((n,), 2), torch.full((n,), 15))
        assert found.tolist() == [their_rank(s, theta, 15) for s in sigmas]


def test_the_tail_defect_differs_from_the_paper_rule_where_the_last_value_counts():
    """σ = (1, 0.5, 0.3, 0.3): with σ_4 in the tail nothing below rank 3 qualifies at ϑ = 0.3; without it rank 2 does."""
    sigma = torch.tensor([1.0, 0.5, 0.3, 0.3], dtype=torch.float64)
    settings = (torch.tensor([0.3], dtype=torch.float64), torch.tensor([True]), torch.tensor([1]), torch.tensor([4]))
    assert dlrt.integrators.truncation_rank_tensor([sigma], *settings).tolist() == [3]
    assert with_defects.ranks_with_the_tail_defect([sigma], *settings).tolist() == [2]


def their_truncated_factors(U0, S0, V0, grad_K, grad_L, core_W, lr, r1):
    """optimizer_KLS/dlrt_optimizer.py (COMPiLELab/DLRT-Net), transcribed: their bases qr([K1, U0]) and
    qr([L1, V0]) (:47-48, :102-103), their core Ûᵀ Ŵ V̂ (the S-step's result, here read from the augmented W),
    its SVD and the rotations of :223-225, V with the first r1 columns of v2 = Qᵀ."""
    U_hat = torch.linalg.qr(torch.cat([U0 @ S0 - lr * grad_K, U0], dim=1)).Q
    V_hat = torch.linalg.qr(torch.cat([V0 @ S0.T - lr * grad_L, V0], dim=1)).Q
    u2, d, v2 = torch.linalg.svd(U_hat.T @ core_W @ V_hat)
    return U_hat @ u2[:, :r1], torch.diag(d[:r1]), V_hat @ v2[:, :r1]


def test_the_rotation_defect_is_their_rotation_in_their_bases(monkeypatch):
    """One rank-adaptive step with the defect put in gives the factors their post-processing gives from the same
    gradients and core; without it the step keeps the best rank-r1 part of the augmented W, another W."""
    model = seeded(small_mlp)
    runs = {}
    for defect in (False, True):
        if defect:
            monkeypatch.setattr(dlrt.functional._RankAdaptive, "finish", with_defects.finish_with_the_rotation_defect)
        copy_ = seeded(small_mlp)
        copy_.load_state_dict(model.state_dict())
        opt = DLRTOptimizer(copy_, lr=0.5, tau=0.0, r_max=4)  # ϑ = 0: each rank doubles, capped at 4
        x, y = batch_for(copy_)
        torch.nn.functional.cross_entropy(copy_(x), y).backward()
        before = [(l.U.detach().clone(), l.S.detach().clone(), l.V.detach().clone(), l.U.grad.clone(),
                   l.V.grad.clone()) for l in low_rank_layers(copy_)]
        plan = opt.prepare_step()
        augmented_W = [torch.cat([s.U, s.new_bases[0]], 1) @ s.core @ torch.cat([s.V, s.new_bases[1]], 1).T
                       for s in plan.steps]
        opt.finish_step(plan, plan.new_ranks.tolist())
        runs[defect] = (low_rank_layers(copy_), before, augmented_W)
    (correct, before, augmented_W), (defective, _, _) = runs[False], runs[True]
    for ours, theirs, (U0, S0, V0, grad_K, grad_L), W_hat in zip(correct, defective, before, augmented_W):
        U1, S1, V1 = their_truncated_factors(U0, S0, V0, grad_K, grad_L, W_hat, 0.5, theirs.rank)
        torch.testing.assert_close(theirs.U, U1)
        torch.testing.assert_close(theirs.S, S1)
        torch.testing.assert_close(theirs.V, V1)
        tail = torch.linalg.svdvals(W_hat)[ours.rank:].norm()  # the correct step: the best rank-r1 W
        torch.testing.assert_close((W_hat - ours.dense_weight()).norm(), tail)
        assert (theirs.dense_weight() - ours.dense_weight()).norm() > 1e-3 * ours.dense_weight().norm()


def test_the_rotation_defect_refuses_what_their_code_cannot_do():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.5, tau=0.1, optimizer="sgd", momentum=0.9)
    x, y = batch_for(model)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    plan = opt.prepare_step()
    with pytest.raises(ValueError, match="plain SGD"):
        with_defects.finish_with_the_rotation_defect(dlrt.functional.METHODS["adaptive"], plan,
                                                     plan.new_ranks.tolist())


def test_a_run_with_the_defects_trains_and_records(tmp_path):
    result = python(SCRIPT, "model=lenet5", "tau=0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = tmp_path.glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
