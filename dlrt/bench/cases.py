"""What the bench times: cases (one model at stated ranks with its training recipe) and runners (a model and an
optimizer that take a training step and an inference pass), on synthetic batches already on the device."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dlrt import functional as fns
from dlrt.graphs import GraphedStep
from dlrt.groups import RULE_DEFAULTS, make_defaults, make_dense_optimizer
from dlrt.layers import low_rank_layers
from dlrt.optim import DLRTOptimizer
from dlrt.experiments.models import build_model
from dlrt.experiments.protocols import FC500_RANKS_AT_0_09, LENET5_RANKS_AT_0_15, RECIPES

from .timing import CpuShare

DENSE_METHODS = ("dense", "dense_fused")
# the adaptive step with r_min = r_max = the starting ranks per layer; graphed: replayed from CUDA graphs
PINNED_METHODS = ("adaptive_pinned", "adaptive_graphed")


@dataclass
class Case:
    """One model at one set of ranks with its training recipe (PAPER.md §2)."""

    name: str
    model: str
    options: dict
    rank: int | list[int]
    batch: int
    tau: float
    optimizer: str  # "sgd" or "adam", for DLRT and the dense baseline alike
    lr: float
    input_shape: tuple = (1, 28, 28)
    num_classes: int = 10
    methods: tuple | None = None  # the methods timed on it (None: the suite's)


def _paper_case(name: str, model: str, options: dict, rank, tau: float, batch: int | None) -> Case:
    recipe = RECIPES[model]
    return Case(name, model, options, rank, batch or recipe.batch_size, tau, recipe.optim, recipe.lr)


def step_cases(quick: bool) -> list[Case]:
    """The paper's nets at the ranks it reports, with its recipes (LeNet5: SGD lr 0.05, batch 128; FC 784-500x4-10:
    Adam lr 1e-3, batch 256), and the FC net at rank 40; --quick keeps the shapes and cuts the batches to 16."""
    batch = 16 if quick else None
    return [
        _paper_case("lenet5_t0.15", "lenet5", {}, list(LENET5_RANKS_AT_0_15), 0.15, batch),
        _paper_case("fc500_t0.09", "fc", {"width": 500}, list(FC500_RANKS_AT_0_09), 0.09, batch),
        _paper_case("fc500_r40", "fc", {"width": 500}, 40, 0.09, batch),
    ]


def imagenet_case(batch: int) -> Case:
    """ResNet-50 at ImageNet shapes (224 x 224, 1000 classes), the layers at half their full rank (the runner's
    start), the paper's ImageNet recipe (SGD lr 0.05, ϑ = 0.1); dense and the adaptive step only: other methods'
    steps of this net take minutes."""
    case = _paper_case("resnet50_imagenet", "resnet50", {}, None, 0.1, batch)
    case.input_shape, case.num_classes, case.methods = (3, 224, 224), 1000, ("dense", "adaptive")
    return case


def timing_study_case(rank: int, width: int, batch: int) -> Case:
    """PAPER.md §3's timing study: 784-width x4-10 at one rank for every layer, SGD lr 0.01."""
    return Case("timing_study", "fc", {"width": width}, rank, batch, 0.1, "sgd", 0.01)


@dataclass
class Runner:
    """A model with its step, and what timing it measured."""

    name: str
    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], object] | None  # None: an inference-only runner
    opt: torch.optim.Optimizer | None
    train_ms: list = field(default_factory=list)
    train_cpu_ms: list = field(default_factory=list)
    infer_ms: list = field(default_factory=list)
    infer_cpu_ms: list = field(default_factory=list)
    ranks_seen: list = field(default_factory=list)
    cpu_share: CpuShare = field(default_factory=CpuShare)
    error: str = ""  # set when a step raised: the runner is then left out of further timing
    steps_per_call: int = 1  # a basis_every=k method's step is a whole cycle of k steps: its times are per step

    def ranks(self) -> list[int]:
        return [layer.rank for layer in low_rank_layers(self.model)]

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> None:
        self.model(x)


def training_step(model: nn.Module, opt: torch.optim.Optimizer, two_pass: bool = False):
    """zero_grad + forward + cross-entropy + backward + opt.step. A two-pass method (fixed) takes opt.step(closure)
    alone: the optimizer calls the closure first, and again at the moved basis."""

    def step(x, y):
        if two_pass:
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            return
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def pin_ranks(opt: DLRTOptimizer) -> None:
    """Clamp every layer's rank to the one it has now (per-layer r_min = r_max; each layer gets a param group)."""
    for layer, rank in zip(opt.layers, opt.ranks()):
        opt.set_rank_bounds(layer, rank, rank)


def build(case: Case, device: torch.device, low_rank: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with device:  # factors are drawn and factorised on the device itself (fast on a GPU)
        model = build_model(case.model, case.input_shape, case.num_classes, low_rank=low_rank,
                            rank=case.rank if low_rank else None, **case.options)
    return model.to(device)


def dense_optimizer(params, case: Case, fused: bool) -> torch.optim.Optimizer:
    """The torch optimizer DLRTOptimizer gives dense parameters (dlrt.groups.make_dense_optimizer) for the case's
    update rule; unless `fused`, switched to torch's default implementation by its param-group flags."""
    opt = make_dense_optimizer(None, list(params), make_defaults(lr=case.lr, optimizer=case.optimizer, **RULE_DEFAULTS))
    if not fused:
        for group in opt.param_groups:
            group["fused"] = None
            if "capturable" in group:  # Adam: its step counts on the host, as by default
                group["capturable"] = False
    return opt


def with_basis_every(methods, basis_every: list[int]) -> list[str]:
    """The methods, and after each adaptive one its variants at basis_every = k (`adaptive_k10`)."""
    found = []
    for method in methods:
        found.append(method)
        if method.split("_")[0] == "adaptive":
            found += [f"{method}_k{k}" for k in basis_every if k != 1]
    return found


def split_basis_every(method: str) -> tuple[str, int]:
    """'adaptive_graphed_k10' -> ('adaptive_graphed', 10); a method without the suffix has k = 1."""
    found = re.fullmatch(r"(.+)_k(\d+)", method)
    return (found.group(1), int(found.group(2))) if found else (method, 1)


def make_runner(method: str, case: Case, device: torch.device, base: nn.Module | None = None,
                r_min: int | None = None, r_max: int | None = None, svd_on: str = "auto",
                checked_shortcuts: bool | None = None) -> Runner:
    """A fresh model and optimizer for `method`: dense (plain nn layers, torch.optim's default), dense_fused (torch's
    fused kernel), a DLRT method (dlrt.functional.METHODS), adaptive_pinned or adaptive_graphed, each of the
    rank-adaptive ones at basis_every = k with the suffix `_k<k>` (a timed call is then a whole cycle of k steps, one
    basis step and k - 1 coefficient steps, and its times are divided by k). Low-rank models are copies of `base`
    when given. checked_shortcuts: DLRTOptimizer's (graphed steps always take False)."""
    name = method
    method, basis_every = split_basis_every(method)
    if method in DENSE_METHODS:
        model = build(case, device, low_rank=False)
        opt = dense_optimizer(model.parameters(), case, fused=method == "dense_fused")
        return Runner(method, model, training_step(model, opt), opt)
    model = copy.deepcopy(base) if base is not None else build(case, device, low_rank=True)
    dlrt_method = "adaptive" if method in PINNED_METHODS else method
    options = {} if r_min is None else {"r_min": r_min, "r_max": r_max}
    if method == "adaptive_graphed":  # a graph cannot hold the shortcuts' checks on the host
        checked_shortcuts = False
    opt = DLRTOptimizer(model, lr=case.lr, tau=case.tau, method=dlrt_method, optimizer=case.optimizer,
                        svd_on=svd_on, checked_shortcuts=checked_shortcuts, basis_every=basis_every, **options)
    if method in PINNED_METHODS:
        pin_ranks(opt)
    if method == "adaptive_graphed":
        step = GraphedStep(model, opt, F.cross_entropy)
    else:
        step = training_step(model, opt, fns.METHODS[dlrt_method].passes == 2)
    return Runner(name, model, step if basis_every == 1 else _cycle(step, basis_every), opt,
                  steps_per_call=basis_every)


def _cycle(step, k: int):
    """k steps on the batch: one whole basis cycle (the basis step first, as the optimizer counts from it)."""
    def cycle(x, y):
        for _ in range(k):
            step(x, y)
    return cycle


def synthetic_batches(case: Case, device: torch.device, count: int, seed: int = 1):
    """`count` distinct random batches (inputs and labels) on the device.

    Enough of them that the timed steps do not memorise them: a dense FC net fits 4 batches of random
    labels in ~30 Adam steps, and once its loss is ~0 the gradients go subnormal and the CPU slows down
    for reasons that have nothing to do with the method (seen: a dense backward 10x slower).
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn((case.batch, *case.input_shape), generator=g)
        y = torch.randint(0, case.num_classes, (case.batch,), generator=g)
        batches.append((x.to(device), y.to(device)))
    return batches
