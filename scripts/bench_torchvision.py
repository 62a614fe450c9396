"""Issue 6's figures: VGG16 and ResNet-50 at ImageNet shapes under DLRT.

For each net: the converted layers, the full-rank and initial-rank parameter counts, and the median ms of a
training step (batch 8, 224x224) for dense training and for the adaptive DLRT step, on this machine.

    python scripts/bench_torchvision.py [--batch 8] [--rank-fraction 0.1] [--steps 3] [--threads 1]
"""

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.metrics import parameter_report
from dlrt.experiments.models import build_model
from dlrt.experiments.run_folder import atomic_write


def step_ms(model, opt, batch, steps):
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/bench/torchvision_nets.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("resnet50", "vgg16"):
        torch.manual_seed(0)
        dense = build_model(name, (3, 224, 224), 1000, low_rank=False)
        dense_ms = step_ms(dense, DLRTOptimizer(dense, lr=0.01, momentum=0.1), args.batch, args.steps)
        del dense
        model = build_model(name, (3, 224, 224), 1000, rank=args.rank_fraction)
        report = parameter_report(model)
        opt = DLRTOptimizer(model, lr=0.01, tau=0.1, momentum=0.1)
        adaptive_ms = step_ms(model, opt, args.batch, args.steps)
        rows.append({
            "model": name, "converted_layers": len(low_rank_layers(model)),
            "full_rank_weight_params": report["dense_params_eval"],
            "initial_rank_fraction": args.rank_fraction,
            "initial_params_eval_honest": report["params_eval_honest"], "initial_cr_eval_honest": report["cr_eval_honest"],
            "initial_params_eval_paper": report["params_eval_paper"],
            "batch": args.batch, "dense_step_ms": dense_ms, "adaptive_step_ms": adaptive_ms,
            "ratio": adaptive_ms / dense_ms, "ranks_after": " ".join(map(str, opt.ranks())),
            "device": f"{platform.processor() or platform.machine()} CPU", "threads": args.threads,
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
        })
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    print(pd.DataFrame(rows)[["model", "converted_layers", "full_rank_weight_params", "initial_params_eval_honest",
                              "dense_step_ms", "adaptive_step_ms", "ratio"]].to_string(index=False))


if __name__ == "__main__":
    main()
