"""Parameter counts and compression rates, in three conventions (PAPER.md §4). Biases are never counted,
nor normalisation parameters: only the weight matrices of linear and conv layers.

A low-rank layer has an n x m weight (n = outputs, m = inputs; a conv's C_out x C_in k k) at rank r.

- ``honest``: what is stored.
  eval:  (n + m) r + r       U, V and the diagonal of S after truncation
  train: 3 (n + m) r + 6 r²  U, S, V and their gradients, the new directions Ũ, Ṽ and the 2r x 2r core
- ``paper``: the LeNet5 table's counts, which leave the n_in x r factor out of the eval count.
  eval:  (n + 1) r
  train: 5 (n + m) r + 12 r²
- ``fc``: the FC tables' counts (dlrt.report.fc).
  eval:  (n + m) r
  train: 2 (n + m) r + 4 r²
In every convention a dense layer counts n m for eval and 2 n m (weight and gradient) for train. Run records
(parameter_report) hold the honest and the LeNet5 table's counts; the FC tables compute theirs from the ranks.

The compression rate is (1 - params / dense params) x 100 %, the dense reference being the same model
with every low-rank layer at full size (n m for eval, 2 n m for train).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import LowRankLayer

CONVENTIONS = ("honest", "paper", "fc")
RECORDED = ("honest", "paper")  # parameter_report's
MODES = ("eval", "train")


def low_rank_layer_count(n: int, m: int, r: int, convention: str = "honest", mode: str = "eval") -> int:
    """Parameters counted for one n x m low-rank layer at rank r."""
    _check(convention, mode)
    if convention == "honest":
        return (n + m) * r + r if mode == "eval" else 3 * (n + m) * r + 6 * r * r
    if convention == "fc":
        return (n + m) * r if mode == "eval" else 2 * (n + m) * r + 4 * r * r
    return (n + 1) * r if mode == "eval" else 5 * (n + m) * r + 12 * r * r


def dense_layer_count(n: int, m: int, mode: str = "eval") -> int:
    """Parameters counted for one dense n x m weight (the same in every convention)."""
    _check("honest", mode)
    return n * m if mode == "eval" else 2 * n * m


def compression_rate(params: int, dense_params: int) -> float:
    """(1 - params / dense params) x 100 %."""
    return (1 - params / dense_params) * 100.0


def _check(convention, mode):
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")


@dataclass(frozen=True)
class WeightShape:
    """One weight matrix of a model: n x m, at rank r (None when it is dense)."""

    name: str
    n: int
    m: int
    rank: int | None


def weight_shapes(model: nn.Module) -> list[WeightShape]:
    """The weight matrices that count: low-rank layers, and dense nn.Linear / nn.Conv2d weights."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankLayer):
            shapes.append(WeightShape(name, module.out_dim, module.in_dim, module.rank))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            shapes.append(WeightShape(name, weight.shape[0], weight[0].numel(), None))
    return shapes


def count_shapes(shapes: list[WeightShape], convention: str = "honest", mode: str = "eval") -> int:
    return sum(
        dense_layer_count(s.n, s.m, mode) if s.rank is None else low_rank_layer_count(s.n, s.m, s.rank, convention, mode)
        for s in shapes
    )


def dense_reference(shapes: list[WeightShape], mode: str = "eval") -> int:
    return sum(dense_layer_count(s.n, s.m, mode) for s in shapes)


def parameter_report(model: nn.Module) -> dict[str, float]:
    """Counts and compression rates in the RECORDED conventions, for eval and train, plus the dense references.

    Keys: params_{eval,train}_{honest,paper}, cr_{eval,train}_{honest,paper}, dense_params_{eval,train}.
    """
    shapes = weight_shapes(model)
    report: dict[str, float] = {}
    for mode in MODES:
        dense = dense_reference(shapes, mode)
        report[f"dense_params_{mode}"] = dense
        for convention in RECORDED:
            count = count_shapes(shapes, convention, mode)
            report[f"params_{mode}_{convention}"] = count
            report[f"cr_{mode}_{convention}"] = compression_rate(count, dense)
    return report
