"""The schema of dlrt-run's config: every key, its type and its choices, as structured configs.

The configs are the YAML files under CONFIG_DIR (configs/). The top level (RunSchema) is the base of config.yaml,
and the method, optim and synthetic data options extend their group's schema (`adaptive_schema`, ...), so Hydra
checks keys and types while it composes, and the defaults the method and the data generator define
(dlrt.experiments.defaults) are written nowhere else. dlrt.experiments.validate checks each group against the
schema of the option it names (`group_schema`) and what no schema can say (ranges, keys that depend on each
other), all before any work: a key that no option has is refused. A key the chosen method does not read (ϑ of a
dense run: `unused_keys`) may be given, and is left out of the run folder's config and name. The recipe values
(epochs, lr, ...) come from dlrt.experiments.protocols through the `dlrt.protocol` and `dlrt.default_lr` resolvers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from . import defaults, protocols

# configs/ at the top of a checkout is the one source of the configs; an installed wheel carries it as
# dlrt/experiments/conf (setup.py's package-dir mapping), and where that copy is, it is the one read.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "configs"


class Selection(StrEnum):
    min_val_loss = "min_val_loss"  # the paper's LeNet5 rule
    final = "final"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class SvdOn(StrEnum):
    auto = "auto"
    device = "device"
    host = "host"


class Scheduler(StrEnum):
    none = "none"
    plateau = "plateau"


class FinetuneMethod(StrEnum):
    fixed = "fixed"
    s_only = "s_only"


class Init(StrEnum):
    svd = "svd"
    authors = "authors"


Spectrum = StrEnum("Spectrum", {name: name for name in protocols.SPECTRA})  # the paper's initial spectra


class Split(StrEnum):
    standard = "standard"
    paper = "paper"
    train_test = "train_test"


StatePolicy = StrEnum("StatePolicy", {policy: policy for policy in defaults.STATE_POLICIES})  # update_rules'


def _recipe(key: str) -> str:
    return f"${{dlrt.protocol:${{model.name}},{key}}}"


# --- the groups -------------------------------------------------------------------------------


@dataclass
class ModelSchema:
    name: str = MISSING
    rank: Any = None  # null: ⌊min(n,m)/2⌋ per layer; an int caps every layer; a fraction; a list per layer
    init: Init = Init.svd
    spectrum: Optional[Spectrum] = None


@dataclass
class FCModelSchema(ModelSchema):
    width: int = 500


@dataclass
class ArrayDataSchema:  # mnist, fashion_mnist: one tensor on the device
    name: str = MISSING
    root: str = "data"
    split: Split = _recipe("split")  # type: ignore[assignment]
    subset: Optional[int] = None


@dataclass
class SyntheticDataSchema:  # the generator's own defaults (data.arrays)
    name: str = "synthetic"
    subset: Optional[int] = None
    input_shape: list[int] = field(default_factory=lambda: list(defaults.SYNTHETIC["input_shape"]))
    num_classes: int = defaults.SYNTHETIC["num_classes"]
    n_train: int = defaults.SYNTHETIC["n_train"]
    n_val: int = defaults.SYNTHETIC["n_val"]
    n_test: int = defaults.SYNTHETIC["n_test"]
    noise: float = defaults.SYNTHETIC["noise"]


@dataclass
class ImageDataSchema:  # cifar10, imagenet: image folders read by DataLoader workers
    name: str = MISSING
    root: str = "data"
    subset: Optional[int] = None
    workers: int = 4


# The method's and the update rules' keys are DLRTOptimizer's arguments, with its defaults.


@dataclass
class MethodSchema:  # dense, vanilla, vanilla_frozen_convs: no truncation, no basis rotation
    name: str = MISSING


@dataclass
class FixedMethodSchema(MethodSchema):  # rotates its bases: its optimizer state follows a policy
    state_policy: StatePolicy = StatePolicy(defaults.OPTIMIZER["state_policy"])


@dataclass
class AdaptiveMethodSchema(FixedMethodSchema):  # adaptive, parallel
    absolute_tau: bool = defaults.OPTIMIZER["absolute_tau"]
    r_min: int = defaults.OPTIMIZER["r_min"]
    r_max: Optional[int] = defaults.OPTIMIZER["r_max"]  # null: ⌊min(n,m)/2⌋ per layer
    basis_every: int = defaults.OPTIMIZER["basis_every"]  # a basis step every k-th batch, S-only steps between


@dataclass
class SGDSchema:
    name: str = "sgd"
    momentum: float = defaults.OPTIMIZER["momentum"]


@dataclass
class AdamSchema:
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: list(defaults.OPTIMIZER["betas"]))
    eps: float = defaults.OPTIMIZER["eps"]


class MethodOf(NamedTuple):
    steps_as: str  # the method of dlrt.functional.METHODS that DLRTOptimizer steps it with
    schema: type  # of its config group


# dlrt-run's methods, the one list of them. dense: the net with dense layers only, whose parameters DLRTOptimizer's
# dense optimizer steps; vanilla_frozen_convs: vanilla with the low-rank convs frozen (runtime.make_model).
METHODS = {"adaptive": MethodOf("adaptive", AdaptiveMethodSchema), "parallel": MethodOf("parallel", AdaptiveMethodSchema),
           "fixed": MethodOf("fixed", FixedMethodSchema), "vanilla": MethodOf("vanilla", MethodSchema),
           "dense": MethodOf("adaptive", MethodSchema), "vanilla_frozen_convs": MethodOf("vanilla", MethodSchema)}
# the methods that truncate at ϑ (tau), and that a fine-tuning phase may follow
RANK_ADAPTIVE = tuple(name for name, method in METHODS.items() if method.schema is AdaptiveMethodSchema)


# --- the whole config -------------------------------------------------------------------------


@dataclass
class SchedulerSchema:
    name: Scheduler = Scheduler.none  # plateau: ReduceLROnPlateau on the validation loss, once per epoch
    factor: float = 0.1
    patience: int = 10


@dataclass
class FinetuneSchema:
    method: FinetuneMethod = FinetuneMethod.fixed
    epochs: int = _recipe("finetune_epochs")  # type: ignore[assignment]
    # the fine-tuning phase's optimizer state policy; null: method.state_policy (the authors' FC procedure restarts
    # Adam only in its rank-adaptive phase: their fixed-rank layers keep their variables, configs/experiment/
    # fc_mnist_authors.yaml)
    state_policy: Optional[StatePolicy] = None


@dataclass
class RunSchema:
    tau: float = 0.15
    seed: int = 0
    selection: Selection = Selection.min_val_loss
    epochs: int = _recipe("epochs")  # type: ignore[assignment]
    batch_size: int = _recipe("batch_size")  # type: ignore[assignment]
    lr: float = "${dlrt.default_lr:${model.name},${optim.name}}"  # type: ignore[assignment]
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    threads: Optional[int] = None
    flush_denormal: bool = True
    cuda_graphs: bool = False
    svd_on: SvdOn = SvdOn(defaults.OPTIMIZER["svd_on"])
    out_dir: str = "runs"
    # 256: on a CPU a LeNet5 evaluates 1.5-1.9x slower in batches of 2048 (results/bench/eval_batch/); a GPU
    # evaluates MNIST in a few dozen calls either way
    eval_batch_size: int = 256
    progress: bool = True
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    model: Any = MISSING
    data: Any = MISSING
    method: Any = MISSING
    optim: Any = MISSING


def group_schema(group: str, name: str):
    """The schema of a group option, by the name its node carries (a user's own option extends one of ours)."""
    if group == "model":
        return FCModelSchema if name == "fc" else ModelSchema
    if group == "data":
        return {"synthetic": SyntheticDataSchema, "cifar10": ImageDataSchema, "imagenet": ImageDataSchema}.get(
            name, ArrayDataSchema)
    if group == "method":
        return METHODS[name].schema if name in METHODS else MethodSchema
    return AdamSchema if name == "adam" else SGDSchema


# --- what a run reads --------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"name": "fc"}} -> {"model.name": "fc"}, lists as tuples (so values compare), Hydra's node left out."""
    flat = {}
    for key, value in tree.items():
        if key == "hydra":
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def unused_keys(flat: dict) -> set[str]:
    """The keys of a flattened config that its run does not read: ϑ and the fine-tuning phase outside the
    rank-adaptive methods (finetune.method and .state_policy when there are no fine-tuning epochs; .state_policy
    also when null, the method's), the plateau scheduler's factor and patience without it, and model.init for the
    dense net. Every command may give them (`method=dense tau=0`); a run folder's config and name leave them out."""
    method = flat.get("method.name")
    unused = {"model.init"} if method == "dense" else set()
    if method not in RANK_ADAPTIVE:
        unused |= {"tau", "finetune.method", "finetune.epochs", "finetune.state_policy"}
    elif flat.get("finetune.epochs") == 0:
        unused |= {"finetune.method", "finetune.state_policy"}
    if flat.get("finetune.state_policy") is None:  # the method's: runs from before the key existed read the same
        unused.add("finetune.state_policy")
    if flat.get("scheduler.name") == Scheduler.none:
        unused |= {"scheduler.factor", "scheduler.patience"}
    return unused & set(flat)


def used(flat: dict) -> dict:
    """A flattened config without its unused_keys."""
    unused = unused_keys(flat)
    return {key: value for key, value in flat.items() if key not in unused}


def recorded(cfg) -> dict:
    """The resolved config a run folder records: what the run reads (no unused_keys), as plain data."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in unused_keys(flatten(tree)):
        *groups, leaf = key.split(".")
        node = tree
        for group in groups:
            node = node[group]
        del node[leaf]
        if groups and not node:  # finetune: every key unused
            del tree[groups[0]]
    return tree


def register() -> None:
    """Put the run schema into Hydra's ConfigStore and the recipe resolvers into OmegaConf (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunSchema)
    # the bases of the group options whose keys the schema fills (configs/method/adaptive.yaml: `defaults:
    # [adaptive_schema, _self_]`)
    for group, name, node in (("method", "adaptive_schema", AdaptiveMethodSchema),
                              ("method", "fixed_schema", FixedMethodSchema), ("optim", "sgd_schema", SGDSchema),
                              ("optim", "adam_schema", AdamSchema), ("data", "synthetic_schema", SyntheticDataSchema)):
        store.store(group=group, name=name, node=node)
    for name, resolver in (("dlrt.protocol", protocols.recipe_value), ("dlrt.default_lr", protocols.default_lr)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
