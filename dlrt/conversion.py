"""Put low-rank layers into any model (torchvision's included) by rules, and merge them back out.

    model, report = dlrt.convert(torchvision.models.resnet50(), rank=0.25)
    print(report)                       # what was converted, with shapes and ranks, and what was kept dense
    model = dlrt.merge(model)           # plain nn.Linear / nn.Conv2d again, in place, for export

    config = dlrt.ConvertConfig(rank=0.25, exclude=["layer4.*"])   # the same choice as data, as peft's LoraConfig
    model, report = dlrt.convert(torchvision.models.resnet50(), config=config)
    dlrt.ConvertConfig.of(model).to_dict()   # the choice that remakes a model's low-rank layers at their ranks now

Which modules are converted: every nn.Linear and nn.Conv2d whose qualified name matches `include`
(fnmatch patterns, default all) and none of `exclude`, except, by default, the model's first conv (its
matrix is tiny, C_out x C_in k k with C_in = 3) and its last linear layer (the classifier), as the paper
does. Grouped convs stay dense (DLRT's matrix view needs groups = 1).
"""

from __future__ import annotations

import glob
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatch
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .layers import LowRankConv2d, LowRankLayer, LowRankLinear

Rank = int | float | None | Sequence[int] | dict[str, int] | Callable[[str, int, int], int]


@dataclass
class ConvertConfig:
    """Which layers dlrt.convert makes low-rank, and at what rank, as data (as peft's LoraConfig): convert's
    arguments of the same names, and what dlrt.export stores so that a file rebuilds from the dense network. How
    the factors start (from_weights, init) is not part of it: that is convert's own choice each time."""

    rank: int | float | list[int] | dict[str, int] | None = None  # a rank function cannot be stored
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    keep_first_conv: bool = True
    keep_classifier: bool = True

    def to_dict(self) -> dict:
        """JSON values only."""
        if callable(self.rank):
            raise ValueError("a rank function cannot be stored: store ConvertConfig.of(model), its ranks by name")
        return {**asdict(self), "include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, values: dict) -> "ConvertConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ConvertConfig key(s) {', '.join(unknown)}: the keys are "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**values)

    @classmethod
    def of(cls, model: nn.Module) -> "ConvertConfig":
        """The config that remakes the model's low-rank layers, by name and at their ranks now, from its dense
        counterpart (what dlrt.export stores: a trained model's ranks are not those it was converted at)."""
        ranks = {name: module.rank for name, module in model.named_modules() if isinstance(module, LowRankLayer)}
        return cls(rank=ranks, include=[glob.escape(name) for name in ranks], keep_first_conv=False,
                   keep_classifier=False)


@dataclass
class ConversionEntry:
    name: str
    kind: str  # "linear" or "conv"
    shape: tuple[int, int]  # the weight matrix, n x m
    rank: int | None  # None: kept dense
    note: str = ""


@dataclass
class ConversionReport:
    entries: list[ConversionEntry] = field(default_factory=list)

    @property
    def converted(self) -> list[ConversionEntry]:
        return [e for e in self.entries if e.rank is not None]

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'kind':<6} {'matrix':>13} {'rank':>6}  note"]
        for e in self.entries:
            rank = "dense" if e.rank is None else str(e.rank)
            lines.append(f"{e.name:<40} {e.kind:<6} {e.shape[0]:>6}x{e.shape[1]:<6} {rank:>6}  {e.note}")
        lines.append(f"{len(self.converted)} of {len(self.entries)} linear/conv layers converted")
        return "\n".join(lines)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    return module.weight.shape[0], module.weight[0].numel()


def _choose_rank(rank: Rank, name: str, n: int, m: int) -> int:
    """None: ⌊min(n,m)/2⌋; an int: that rank, capped at min(n,m); a float in (0, 1]: that fraction of min(n,m);
    a function (name, n, m) -> rank: its rank, which must fit the layer."""
    full = min(n, m)
    if callable(rank):
        chosen = rank(name, n, m)
        _check_rank(chosen, f"the rank chosen for {name}")
        if chosen > full:
            raise ValueError(f"rank {chosen} chosen for {name} is larger than its {n}x{m} weight allows (at most {full})")
        return chosen
    if rank is None:
        return max(1, full // 2)
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        return max(1, round(rank * full))
    _check_rank(rank, "rank")
    return min(rank, full)


def _check_rank(rank, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be an integer >= 1, a fraction in (0, 1] or None, got {rank!r}")


def _per_layer(ranks: Sequence[int], count: int) -> Callable[[str, int, int], int]:
    """A rank function that hands out `ranks` in the order the layers are converted."""
    if len(ranks) != count:
        raise ValueError(f"{len(ranks)} ranks given for {count} layers to convert: give one rank per layer")
    given = iter(enumerate(ranks, start=1))

    def next_rank(name: str, n: int, m: int) -> int:
        index, rank = next(given)
        _check_rank(rank, f"the rank of layer {index}")
        if rank > min(n, m):
            raise ValueError(f"rank {rank} is larger than layer {index} ({name}, a {n}x{m} weight) allows: "
                             f"at most {min(n, m)}")
        return rank
    return next_rank


def _by_name(ranks: dict[str, int]) -> Callable[[str, int, int], int]:
    """A rank function that gives each layer the rank its qualified name has in `ranks`."""
    def rank_of(name: str, n: int, m: int) -> int:
        if name not in ranks:
            raise ValueError(f"the rank dict gives no rank for {name}: add it, or leave it out with exclude")
        return ranks[name]
    return rank_of


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` in `model`; returns the model, which is `module` itself when name is "" (the root)."""
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return model


def convert(
    model: nn.Module,
    rank: Rank = None,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
    from_weights: bool = True,
    init: str = "svd",
    config: ConvertConfig | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace the model's Linear/Conv2d layers by low-rank ones, in place; returns (model, report).

    config: the arguments rank to keep_classifier as one ConvertConfig (then leave them out).

    rank: None, an int, a fraction or a function (name, n, m) -> rank (see _choose_rank); a list, one rank per
    converted layer in the model's order; or a dict {qualified name: rank}, as dlrt.export stores a conversion.
    from_weights=True starts each layer at the truncated SVD of its current weight (a pretrained model
    starts at its best low-rank approximation); False draws fresh factors, by `init` (layers.INITS):
    "svd" (the truncated SVD of a fresh torch draw) or "authors" (the published code's random factors).
    """
    if config is not None:
        if (rank, tuple(include), tuple(exclude), keep_first_conv, keep_classifier) != (None, ("*",), (), True, True):
            raise ValueError("convert was given a config and rank/include/exclude/keep_* arguments: give one of them")
        rank, include, exclude = config.rank, config.include, config.exclude
        keep_first_conv, keep_classifier = config.keep_first_conv, config.keep_classifier
    if from_weights and init != "svd":
        raise ValueError(f"init={init!r} draws fresh factors: pass from_weights=False with it")
    include, exclude = list(include), list(exclude)
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    convs = [name for name, m in candidates if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in candidates if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs and keep_first_conv else None
    classifier = linears[-1] if linears and keep_classifier else None

    report = ConversionReport()
    selected = [(name, module) for name, module in candidates if _skip_reason(name, module, first_conv, classifier,
                                                                               include, exclude) is None]
    if isinstance(rank, (list, tuple)):
        rank = _per_layer(rank, len(selected))
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - {name for name, _ in selected})
        if unknown:
            raise ValueError(f"the rank dict names layers that are not converted ({', '.join(unknown[:3])}): name "
                             "linear or conv layers that include/exclude and keep_first_conv/keep_classifier select")
        rank = _by_name(rank)
    for name, module in candidates:
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        n, m = _matrix_shape(module)
        entry = ConversionEntry(name, kind, (n, m), None)
        report.entries.append(entry)
        entry.note = _skip_reason(name, module, first_conv, classifier, include, exclude) or ""
        if not entry.note:
            entry.rank = _choose_rank(rank, name, n, m)
            model = _replace(model, name, _low_rank(module, entry.rank, from_weights, init))
    return model, report


def _skip_reason(name, module, first_conv, classifier, include, exclude) -> str | None:
    """Why a Linear/Conv2d stays dense, or None when it is converted."""
    if name == first_conv:
        return "first conv, kept dense"
    if name == classifier:
        return "classifier, kept dense"
    if not any(fnmatch(name, p) for p in include) or any(fnmatch(name, p) for p in exclude):
        return "not selected by include/exclude"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                          or isinstance(module.padding, str)):
        return "grouped, non-zero-padded or 'same'-padded conv, kept dense"
    return None


def _low_rank(module: nn.Module, rank: int, from_weights: bool, init: str) -> LowRankLayer:
    if isinstance(module, nn.Linear):
        if from_weights:
            return LowRankLinear.from_linear(module, rank)
        return LowRankLinear(module.in_features, module.out_features, rank, module.bias is not None,
                             init=init).to(module.weight)
    if from_weights:
        return LowRankConv2d.from_conv(module, rank)
    return LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, rank, module.stride,
                         module.padding, module.dilation, module.bias is not None, init=init).to(module.weight)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every low-rank layer by the plain nn.Linear / nn.Conv2d with its dense weight, in place, and return
    the model (as peft's merge_and_unload; a model that is itself one low-rank layer comes back as a new module, so
    write `model = merge(model)`). To keep the low-rank model, merge a copy: merge(copy.deepcopy(model)).

    Each replaced layer is marked `merged = True`, so that an optimizer still holding it refuses to step
    (check_not_merged) rather than train factors that no longer compute anything."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, LowRankConv2d):
            dense = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, bias=module.bias is not None)
        else:
            continue
        dense = dense.to(module.U)
        dense.weight.copy_(module.dense_weight())
        if module.bias is not None:
            dense.bias.copy_(module.bias)
        module.merged = True
        model = _replace(model, name, dense)
    return model


def check_not_merged(layers: Sequence[LowRankLayer]) -> None:
    """Raise, in one line, when dlrt.merge has taken any of these layers out of its model. DLRTOptimizer.step calls
    it: one dictionary read per layer (vars(), since getattr with a default would raise and catch an
    AttributeError inside nn.Module for every layer never merged)."""
    merged = sum(1 for layer in layers if vars(layer).get("merged", False))
    if merged:
        raise RuntimeError(f"{merged} of this optimizer's {len(layers)} low-rank layers were replaced by dense ones "
                           "(dlrt.merge), so its steps would change nothing the model computes: train the merged "
                           "model with a new optimizer, or merge a copy (dlrt.merge(copy.deepcopy(model))) to keep "
                           "training this one")
