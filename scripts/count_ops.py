"""Count the aten operations one training step dispatches, dense against adaptive, per phase.

On a GPU a DLRT step is bound by the host (results/bench/gpu/README.md): its time follows the number of
operations Python dispatches and the kernels they launch, not the arithmetic. This counts them on the CPU,
for the bench's step cases at their ranks. `--gpu-path` makes the optimizer take the GPU's choices (the
full QR, torch.linalg.svd, no accuracy checks) instead of the CPU's shortcuts.

    python scripts/count_ops.py [--gpu-path]
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dlrt.bench.cases import build, make_runner, pin_ranks, step_cases, synthetic_batches

# operations that return a view or alias: no kernel runs for them
VIEWS = {"view", "permute", "detach", "slice", "expand", "transpose", "t", "alias", "select", "diagonal",
         "_unsafe_view", "unsqueeze", "squeeze", "as_strided", "split", "unbind", "_reshape_alias"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not name.startswith("_record_function"):  # the profiler's markers
            self.names[name] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> str:
        total = sum(self.names.values())
        return f"{total} ({total - sum(self.names[v] for v in VIEWS)} not views)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-path", action="store_true", help="the optimizer's GPU choices, on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu")
    print(f"aten operations per training step ({'GPU' if args.gpu_path else 'CPU'} path of the optimizer)")
    for case in step_cases(quick=False)[:2]:
        base = build(case, device, low_rank=True)
        x, y = synthetic_batches(case, device, 1)[0]
        for method in ("dense", "adaptive"):
            # the GPU path: no self-checking shortcuts (DLRTOptimizer's checked_shortcuts=False)
            runner = make_runner(method, case, device, base, checked_shortcuts=False if args.gpu_path else None)
            if method == "adaptive":
                pin_ranks(runner.opt)
            for _ in range(3):  # optimizer state made, ranks settled
                runner.step(x, y)
            phases = {}
            runner.opt.zero_grad()
            with CountOps() as phases["forward"]:
                loss = F.cross_entropy(runner.model(x), y)
            with CountOps() as phases["backward"]:
                loss.backward()
            with CountOps() as phases["optimizer"]:
                runner.opt.step()
            total = CountOps()
            for counted in phases.values():
                total.names += counted.names
            print(f"{case.name:14s} {method:9s} total {total.summary():18s} "
                  + ", ".join(f"{phase} {counted.summary()}" for phase, counted in phases.items()))


if __name__ == "__main__":
    main()
