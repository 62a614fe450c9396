"""The first training steps of LeNet5 on MNIST under DLRT: loss and ranks per step.

Shows how fast a large ϑ collapses the ranks before the net has learnt anything: the truncation is
relative to the current core, so on the flat spectrum of a random initialisation every step cuts
the same share of the remaining rank.

    python results/diagnostics/lenet5_first_steps/first_steps.py --tau 0.45 --seed 0 --steps 390 --every 25
"""

import argparse
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer
from dlrt.experiments.data import load_data, tensor_batches
from dlrt.experiments.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tau", type=float, default=0.45)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=390, help="at most one epoch (391 steps)")
    parser.add_argument("--every", type=int, default=25, help="print every this many steps (and the first 8)")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # as `dlrt-run experiment=lenet5_mnist`: the paper's split and recipe (SGD, lr 0.05, batch 128)
    data = load_data("mnist", root=args.data_root, split="paper", seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("lenet5", (1, 28, 28), 10)
    opt = DLRTOptimizer(model, lr=0.05, tau=args.tau)
    print(f"# LeNet5 / MNIST, adaptive DLRT, ϑ = {args.tau}, seed {args.seed}, SGD lr 0.05, batch 128; "
          f"{platform.machine()} CPU, torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: python {shlex.join(sys.argv)}")
    print(f"start: ranks {opt.ranks()}")
    print("step  loss    ranks")
    batches = tensor_batches(data.train.x, data.train.y, 128, torch.Generator().manual_seed(args.seed))
    for step, batch in zip(range(args.steps), batches):  # the batches dlrt-run draws in one process
        opt.zero_grad()
        loss = F.cross_entropy(model(batch.x), batch.y)
        loss.backward()
        opt.step()
        if step < 8 or step % args.every == 0:
            print(f"{step:4d}  {loss.item():.3f}  {opt.ranks()}")


if __name__ == "__main__":
    main()
