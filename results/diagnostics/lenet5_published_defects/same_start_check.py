"""Does with_defects.py take their step? Their unfixed code (COMPiLELab/DLRT-Net) against dlrt with the two defects
put in, on the same batches of the paper split:

    D=results/diagnostics/lenet5_published_defects
    python $D/same_start_check.py trajectory --repo DLRT-Net --tau 0.13 --seed 0 --steps 40 --every 1
    python $D/same_start_check.py one-step --repo DLRT-Net --tau 0.13 --seed 0 --steps 40 --every 2 [--fixed]
    python $D/same_start_check.py one-step --along dlrt --repo DLRT-Net --tau 0.13 --seed 0 --steps 22

trajectory: both from the same factors, each on its own path (published_adaptive.py same-start, ours with the
defects). one-step: before every step ours is set to their current factors, biases and classifier and takes one
step; the line shows ‖W_ours − W_theirs‖ / ‖W_theirs‖ per low-rank layer after it, i.e. how far one step of each
differs, without the paths' drift; `--along dlrt`: the states are those of dlrt's own path, and their model is set
to them before each step. `--fixed`: their code with both defects fixed against dlrt as it is, the same
measure for two steps that should agree (float32 rounding).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "lenet5_published_adaptive"), str(HERE.parent / "dlrt_vs_uv_sigma1")]

import published_adaptive as published  # noqa: E402
import with_defects  # noqa: E402
from published_fixed_rank import CLASSIFIER, LOW_RANK_LAYERS, their_step  # noqa: E402

from dlrt import DLRTOptimizer  # noqa: E402
from dlrt.experiments.data import load_data  # noqa: E402


def set_theirs_to(theirs, ours) -> None:
    """Their model at dlrt's current factors, biases and classifier (their buffers hold 2r columns; the first r count)."""
    with torch.no_grad():
        for i in LOW_RANK_LAYERS:
            layer, r = theirs.layer[i], ours[i].rank
            layer.U[:, :r], layer.S_hat[:r, :r], layer.V[:, :r] = ours[i].U, ours[i].S, ours[i].V
            layer.dynamic_rank = r
            layer.bias.copy_(ours[i].bias)
        theirs.layer[CLASSIFIER].weight.copy_(ours[CLASSIFIER].weight)
        theirs.layer[CLASSIFIER].bias.copy_(ours[CLASSIFIER].bias)


def their_weight(layer) -> torch.Tensor:
    r = layer.dynamic_rank
    return layer.U[:, :r] @ layer.S_hat[:r, :r] @ layer.V[:, :r].T


def one_step(args) -> None:
    Lenet5, dlr_opt = published.adaptive_code(args.repo, published.FIXES if args.fixed else ())
    data = load_data("mnist", root=args.data_root, split="paper", seed=args.seed)
    torch.manual_seed(args.seed)
    theirs = Lenet5(device="cpu")
    their_optimizer = dlr_opt(theirs, tau=published.LR, theta=args.tau, KLS_optim=torch.optim.SGD)
    x, y = data.train.x, data.train.y
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    ours = published.dlrt_at(theirs)
    optimizer = DLRTOptimizer(ours, lr=published.LR, tau=args.tau, method="adaptive")
    print(f"step  ranks (theirs)  ranks (dlrt)  |W_dlrt - W_theirs| / |W_theirs| after one step from {args.along}'s "
          "state: conv1 conv2 fc1")
    for step in range(args.steps):
        batch = order[step * published.BATCH:(step + 1) * published.BATCH]
        if args.along == "theirs":
            ours = published.dlrt_at(theirs)
            optimizer = DLRTOptimizer(ours, lr=published.LR, tau=args.tau, method="adaptive")
        else:
            theirs = Lenet5(device="cpu")
            set_theirs_to(theirs, ours)
            their_optimizer = dlr_opt(theirs, tau=published.LR, theta=args.tau, KLS_optim=torch.optim.SGD)
        optimizer.zero_grad()
        F.cross_entropy(ours(x[batch]), y[batch]).backward()
        try:
            optimizer.step()
            their_step(theirs, their_optimizer, x[batch], y[batch])
        except (torch.linalg.LinAlgError, ValueError) as error:  # a path that blew up
            print(f"stopped at step {step}: {str(error).splitlines()[0]}")
            return
        if step % args.every == 0 or step == args.steps - 1:
            diffs = [float((ours[i].dense_weight().flatten(1) - their_weight(theirs.layer[i])).norm()
                           / their_weight(theirs.layer[i]).norm()) for i in LOW_RANK_LAYERS]
            print(f"{step:4d}  {str(published.their_ranks(theirs)):>14}  {str(optimizer.ranks()):>12}  "
                  + " ".join(f"{d:.1e}" for d in diffs), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["trajectory", "one-step"])
    parser.add_argument("--repo", required=True, help="a git clone of COMPiLELab/DLRT-Net (checkout or bare)")
    parser.add_argument("--tau", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--along", choices=["theirs", "dlrt"], default="theirs", help="one-step: whose path")
    parser.add_argument("--fixed", action="store_true", help="one-step: their code fixed against dlrt as it is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.fixed:
        with_defects.put_in_defects()
    if args.mode == "trajectory":
        try:
            published.main(["same-start", "--repo", args.repo, "--tau", str(args.tau), "--seed", str(args.seed),
                            "--steps", str(args.steps), "--every", str(args.every), "--data-root", args.data_root])
        except torch.linalg.LinAlgError as error:  # a path that blew up: its next core is not finite
            print(f"stopped: dlrt's next step failed ({str(error).splitlines()[0]})")
    else:
        one_step(args)


if __name__ == "__main__":
    main()
