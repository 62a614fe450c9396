"""The torchvision suite (run only when named): issue 6's figures, VGG16 and ResNet-50 at ImageNet shapes under
DLRT. For each net: the converted layers, the full-rank and initial-rank parameter counts, and the median ms of a
training step (--tv-batch images of 224x224, 1000 classes) for dense training and for the adaptive DLRT step, each
after one warm-up step. results/bench/torchvision_nets.csv holds its CPU figures:

    dlrt-bench --suite torchvision --threads 1 --out results/bench
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.metrics import parameter_report

from .output import Meta, table

MODELS = ("resnet50", "vgg16")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("torchvision suite (--suite torchvision)")
    group.add_argument("--tv-models", type=lambda text: [m for m in text.split(",") if m], default=list(MODELS),
                       help=f"comma-separated subset of {','.join(MODELS)}")
    group.add_argument("--tv-batch", type=int, default=8, help="images per training step")
    group.add_argument("--tv-steps", type=int, default=3, help="timed steps per net and method")
    group.add_argument("--rank-fraction", type=float, default=0.1, help="initial ranks, as a fraction of full rank")


def check_arguments(args, error) -> None:
    unknown = sorted(set(args.tv_models) - set(MODELS))
    if unknown:
        error(f"--tv-models: unknown net(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    if min(args.tv_batch, args.tv_steps) < 1 or not 0 < args.rank_fraction <= 1:
        error("--tv-batch and --tv-steps must be >= 1 and --rank-fraction in (0, 1]")


def step_ms(model, opt, batch: int, steps: int, device: torch.device) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    from dlrt.experiments.models import build_model  # torchvision's nets; imported only when this suite runs

    rows = []
    for name in args.tv_models:
        torch.manual_seed(0)
        dense = build_model(name, (3, 224, 224), 1000, low_rank=False).to(device)
        dense_ms = step_ms(dense, DLRTOptimizer(dense, lr=0.01, momentum=0.1), args.tv_batch, args.tv_steps, device)
        del dense
        model = build_model(name, (3, 224, 224), 1000, rank=args.rank_fraction).to(device)
        counts = parameter_report(model)
        opt = DLRTOptimizer(model, lr=0.01, tau=0.1, momentum=0.1)
        adaptive_ms = step_ms(model, opt, args.tv_batch, args.tv_steps, device)
        rows.append({
            "model": name, "converted_layers": len(low_rank_layers(model)),
            "full_rank_weight_params": counts["dense_params_eval"], "initial_rank_fraction": args.rank_fraction,
            "initial_params_eval_honest": counts["params_eval_honest"],
            "initial_cr_eval_honest": counts["cr_eval_honest"], "initial_params_eval_paper": counts["params_eval_paper"],
            "batch": args.tv_batch, "dense_step_ms": dense_ms, "adaptive_step_ms": adaptive_ms,
            "ratio": adaptive_ms / dense_ms, "ranks_after": " ".join(map(str, opt.ranks())), **meta.fields})
    return rows


def report(rows: list[dict], args, meta: Meta, say) -> None:
    say(f"torchvision nets at ImageNet shapes, batch {args.tv_batch}, median of {args.tv_steps} steps after one:")
    say(table(rows, ["model", "converted_layers", "full_rank_weight_params", "initial_params_eval_honest",
                     "dense_step_ms", "adaptive_step_ms", "ratio"]))
