"""The defaults dlrt-run takes from where they are defined: DLRTOptimizer's signature (r_min, state_policy, the
update rules' momentum, betas and eps, ...), the state policies of dlrt.update_rules and the synthetic data
generator's options. The schema (dlrt.experiments.schema) is built from these, and the configs leave them out, so
each is written once.

They live in modules that import torch, which takes seconds; the schema is read by `dlrt-run --help` and shell
completion, which must stay fast. So the values are read from the modules' source, not imported: only literals
count (a default that is an expression is not a config value). tests/test_defaults.py checks that they are what
importing the modules gives.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

DLRT = Path(__file__).resolve().parents[1]  # the dlrt package


@functools.cache
def _parsed(module: str) -> ast.Module:
    """A module of the dlrt package (`optim`, `experiments.data.arrays`), parsed."""
    return ast.parse(DLRT.joinpath(*module.split(".")).with_suffix(".py").read_text())


def signature_defaults(module: str, cls: str, function: str = "__init__") -> dict:
    """{argument: default} of a method's signature, for the defaults that are literals."""
    klass = next(n for n in _parsed(module).body if isinstance(n, ast.ClassDef) and n.name == cls)
    args = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == function).args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(arg, default) for arg, default in zip(args.kwonlyargs, args.kw_defaults) if default is not None]
    found = {}
    for arg, default in pairs:
        try:
            found[arg.arg] = ast.literal_eval(default)
        except ValueError:  # not a literal
            continue
    return found


def constant(module: str, name: str):
    """The value of a module-level assignment `name = <literal>`."""
    for node in _parsed(module).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"dlrt.{module} has no constant {name}")


OPTIMIZER = signature_defaults("optim", "DLRTOptimizer")  # lr, tau, method, r_min, state_policy, momentum, ...
STATE_POLICIES = constant("update_rules", "STATE_POLICIES")  # what happens to the optimizer state as bases rotate
SYNTHETIC = constant("experiments.data.arrays", "_SYNTHETIC_DEFAULTS")  # input_shape, num_classes, n_train, ...
