"""dlrt: Dynamical Low-Rank Training (Schotthöfer et al., NeurIPS 2022), exact and in one pass per batch.

The method needs only torch: `import dlrt` is cheap, and each name below is imported when first used. The
experiment harness that reproduces the paper (dlrt-run, the tables, the benchmarks) is in dlrt.experiments,
dlrt.report and dlrt.bench, and the method never imports it.
"""

import importlib

_NAMES = {
    "LowRankLayer": "layers", "LowRankLinear": "layers", "LowRankConv2d": "layers", "StepInputs": "layers",
    "low_rank_layers": "layers",
    "convert": "conversion", "ConvertConfig": "conversion", "merge": "conversion", "DLRTOptimizer": "optim",
    "METHODS": "optim",
}
_MODULES = ("conversion", "distributed", "export", "functional", "graphs", "groups", "integrators", "layers",
            "linalg", "metrics", "optim", "update_rules")

__all__ = [*_NAMES, "metrics", "export"]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'dlrt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_NAMES, *_MODULES])
