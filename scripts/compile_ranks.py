"""torch.compile of a model that DLRT trains, on the CPU: how many graphs it compiles as the ranks change, the time
of the first steps, and a compiled against an eager step under the same load (docs/performance.md, torch.compile).

    python scripts/compile_ranks.py default 90     # or dynamic, mark-dynamic, params-dynamic

LeNet5, batch 64, ϑ = 0.15, one thread. After step 10, compiled and eager forwards alternate, so that both medians
see the same load. Set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 to time compiling from nothing.
"""

import statistics
import sys
import time

import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.experiments.models import build_model

VARIANTS = ("default", "dynamic", "mark-dynamic", "params-dynamic")


def mark_rank_dimensions(model: torch.nn.Module) -> None:
    """The factors are new parameters after every rank change, so they are marked before every forward."""
    for layer in low_rank_layers(model):
        dynamo.mark_dynamic(layer.U, 1)
        dynamo.mark_dynamic(layer.S, [0, 1])
        dynamo.mark_dynamic(layer.V, 1)


def main(variant: str, steps: int) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    opt = DLRTOptimizer(model, lr=0.05, tau=0.15)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    if variant == "params-dynamic":
        dynamo.config.force_parameter_static_shapes = False
    compiled = torch.compile(model, dynamic=True if variant == "dynamic" else None)
    times = {"compiled": [], "eager": []}
    start, first10 = time.perf_counter(), None
    for step in range(steps):
        kind = "compiled" if step < 10 or step % 2 == 0 else "eager"
        if kind == "compiled" and variant == "mark-dynamic":
            mark_rank_dimensions(model)
        t = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy((compiled if kind == "compiled" else model)(x), y)
        loss.backward()
        opt.step()
        times[kind].append(time.perf_counter() - t)
        if step == 9:
            first10 = time.perf_counter() - start
    graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
    print(f"{variant}: {graphs} graphs, first 10 steps {first10:.1f} s, then a step: compiled "
          f"{1e3 * statistics.median(times['compiled'][10:]):.0f} ms, eager {1e3 * statistics.median(times['eager']):.0f} ms "
          f"(ranks {opt.ranks()}, loss {loss.item():.4f})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90)
