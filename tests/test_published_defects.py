"""with_defects.py (results/diagnostics/lenet5_published_defects): dlrt-run with the published truncation's two
defects put in. The defects must be theirs, line for line, and nothing else may change."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dlrt import DLRTOptimizer, low_rank_layers
import dlrt.integrators
import dlrt.linalg

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


def test_the_rotation_defect_rotates_v_with_the_rows_of_q(monkeypatch):
    """One rank-adaptive step with the patched SVDs: U as without the defect, V = V̂ Qh[:, :r1] (the first r1 rows
    of Q) instead of V̂ Qh[:r1]ᵀ: orthonormal still, but the wrong basis for the truncated core."""
    model = seeded(small_mlp)
    runs = {}
    for defect in (False, True):
        if defect:
            monkeypatch.setattr(dlrt.linalg, "svds", with_defects.svds_with_the_rotation_defect)
        copy_ = seeded(small_mlp)
        copy_.load_state_dict(model.state_dict())
        opt = DLRTOptimizer(copy_, lr=0.5, tau=0.0, r_max=4)  # ϑ = 0: each rank doubles, capped at 4
        x, y = batch_for(copy_)
        torch.nn.functional.cross_entropy(copy_(x), y).backward()
        plan = opt.prepare_step()
        V_hats = [torch.cat([step.layer.V.detach(), step.new_bases[1]], dim=1) for step in plan.steps]
        svds = [step.svd for step in plan.steps]
        opt.finish_step(plan, plan.new_ranks.tolist())
        runs[defect] = (low_rank_layers(copy_), V_hats, svds)
    (correct, V_hats, svds), (defective, _, _) = runs[False], runs[True]
    for ours, theirs, V_hat, (P, sigma, Qh) in zip(correct, defective, V_hats, svds):
        r1 = ours.rank
        torch.testing.assert_close(ours.U, theirs.U)
        torch.testing.assert_close(ours.V, V_hat @ Qh[:r1].T)
        torch.testing.assert_close(theirs.V, V_hat @ Qh[:, :r1])
        assert not torch.allclose(ours.V, theirs.V)


def test_a_run_with_the_defects_trains_and_records(tmp_path):
    result = python(SCRIPT, "model=lenet5", "tau=0.3", *QUICK, f"out_dir={tmp_path}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = tmp_path.glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
