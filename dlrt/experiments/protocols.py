"""The paper's protocols (PAPER.md §2-3), defined once: the training recipes, the published numbers, each table's
protocol (what its header compares our runs against, and which epoch a run is read at) and the sweeps that make
its rows. The configs read them through the `dlrt.protocol` resolver (recipes, and the experiments' sweeps and
selection rules), `dlrt-tables` for its "paper" columns and headers, `dlrt-tables --missing` for the runs the
tables still miss (the Makefile's reproduce-tables), the plots and the benchmarks.

Numbers are as the paper prints them; the DLRT vs U V^T curves are from the authors' published result files
(COMPiLELab/DLRT-Net at fda7874, UV_vanilla/results_vanilla/: 10 runs per curve; mean and sample standard
deviation of the test accuracy after each epoch; results/ERRATA.md says how they were read).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    """A model's training protocol in the paper: what dlrt-run uses for that model unless told otherwise."""

    optim: str
    lr: float
    batch_size: int
    epochs: int
    finetune_epochs: int
    split: str


RECIPES = {
    "lenet5": Recipe(optim="sgd", lr=0.05, batch_size=128, epochs=20, finetune_epochs=0, split="paper"),
    "fc": Recipe(optim="adam", lr=1e-3, batch_size=256, epochs=250, finetune_epochs=100, split="standard"),
    # the ImageNet protocol; experiment=imagenet_* pins the rest of it (momentum, scheduler, S-only fine-tuning)
    "vgg16": Recipe(optim="sgd", lr=0.05, batch_size=128, epochs=100, finetune_epochs=0, split="standard"),
    "resnet50": Recipe(optim="sgd", lr=0.05, batch_size=128, epochs=100, finetune_epochs=0, split="standard"),
}
# The learning rate when the optimizer is not the recipe's: the usual starting point of each rule.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


def recipe_value(name: str, key: str):
    """The `dlrt.protocol:<name>,<key>` resolver of the configs: a model's recipe value (`lenet5,epochs`), or an
    experiment's selection rule (`fc_mnist,selection`), a setting of its table's protocol (`dlrt_vs_uv,lr`) or swept
    values, comma-separated (`fc_mnist,tau`)."""
    if name in EXPERIMENTS:
        protocol, sweep = EXPERIMENTS[name]
        if key == "selection":
            return protocol.selection
        if key in protocol.settings:
            return protocol.settings[key]
        if key not in sweep.grid:
            raise ValueError(f"experiment {name!r} sweeps {', '.join(sweep.grid)} and sets "
                             f"{', '.join(protocol.settings)}, not {key!r}: see protocols.SWEEPS")
        return ",".join(map(str, sweep.grid[key]))
    if name not in RECIPES:
        raise ValueError(f"no training recipe for model {name!r}: known models are {', '.join(RECIPES)}; "
                         f"set epochs, batch_size, lr and finetune.epochs explicitly for another model")
    return getattr(RECIPES[name], key)


def default_lr(model: str, optim: str) -> float:
    """The recipe's lr with the recipe's optimizer; DEFAULT_LR of another optimizer (optim=adam on LeNet5)."""
    recipe = RECIPES.get(model)
    if recipe is not None and recipe.optim == optim:
        return recipe.lr
    return DEFAULT_LR[optim]


# LeNet5 / MNIST: ϑ (or "dense") -> test acc, ranks, eval params, c.r. eval, train params, c.r. train
PAPER_LENET5 = {
    "dense": ("98.8 ± 0.06", "[20,50,500,10]", 430500, 0.0, 861000, 0.0),
    0.09: ("98.2 ± 0.26", "[10,23,62,10]", 37445, 91.3, 532176, 38.2),
    0.11: ("98.2 ± 0.44", "[10,20,48,10]", 30278, 93.0, 412898, 52.0),
    0.13: ("97.9 ± 0.49", "[9,16,37,10]", 24542, 94.3, 316997, 63.2),
    0.15: ("98.1 ± 0.33", "[9,16,28,10]", 20033, 95.3, 251477, 70.8),
    0.2: ("98.1 ± 0.34", "[8,8,15,10]", 13091, 97.0, 135536, 84.3),
    0.3: ("97.5 ± 0.48", "[4,6,8,10]", 9398, 97.8, 80792, 90.6),
    0.4: ("96.0 ± 0.94", "[2,4,4,10]", 7250, 98.3, 47882, 94.4),
    0.45: ("94.1 ± 0.49", "[2,2,3,10]", 6647, 98.5, 35654, 95.9),
}
PAPER_LENET5_DENSE_ACC = float(PAPER_LENET5["dense"][0].split(" ± ")[0])  # the plots' dense line

# 5-layer FC / MNIST: width -> ϑ (or "dense") -> test acc, ranks of the 4 low-rank layers
PAPER_FC = {
    500: {
        "dense": (98.54, "full"), 0.03: (98.49, "[176,170,171,174]"), 0.05: (98.56, "[81,104,111,117]"),
        0.07: (98.52, "[52,67,73,72]"), 0.09: (98.34, "[35,53,51,46]"), 0.11: (98.11, "[27,40,37,38]"),
        0.13: (97.50, "[20,31,32,30]"), 0.15: (97.22, "[17,25,26,24]"), 0.17: (96.90, "[13,21,24,20]"),
    },
    784: {
        "dense": (98.53, "full"), 0.03: (98.61, "[190,190,190,190]"), 0.05: (98.59, "[124,120,125,126]"),
        0.07: (98.58, "[76,86,85,83]"), 0.09: (98.49, "[56,67,63,59]"), 0.11: (98.12, "[35,49,47,43]"),
        0.13: (97.95, "[29,35,38,34]"), 0.15: (97.81, "[22,29,27,27]"), 0.17: (97.40, "[17,23,22,23]"),
    },
}

# DLRT (fixed-rank KLS) against U V^T, LeNet5 at rank 20: (spectrum, method) -> the test accuracy after each of
# the 20 epochs, mean and sample std over the authors' 10 published runs; the last mean is the paper's number.
PAPER_DLRT_VS_UV_MEAN = {
    ("one", "fixed"): (80.96, 90.02, 92.36, 93.95, 95.06, 95.48, 96.13, 96.40, 96.68, 96.91, 97.11, 97.26, 97.39, 97.54,
                       97.62, 97.59, 97.67, 97.84, 97.82, 97.81),
    ("one", "vanilla"): (32.61, 49.28, 65.25, 74.11, 79.30, 83.58, 85.97, 87.52, 88.67, 89.76, 90.43, 90.84, 91.60,
                         91.97, 92.32, 92.71, 92.87, 93.23, 93.52, 93.74),
    ("pow2", "fixed"): (56.01, 84.00, 89.20, 92.08, 93.61, 94.35, 95.10, 95.67, 95.90, 96.32, 96.42, 96.60, 96.73,
                        96.80, 97.00, 97.02, 97.11, 97.17, 97.20, 97.29),
    ("pow2", "vanilla"): (17.16, 21.08, 33.34, 42.81, 49.11, 60.67, 68.72, 73.37, 76.97, 79.54, 81.76, 83.75, 85.17,
                          86.53, 87.60, 88.45, 89.26, 89.85, 90.33, 90.91),
    ("pow10", "fixed"): (39.06, 77.82, 87.47, 90.69, 92.61, 93.76, 94.78, 95.22, 95.69, 95.87, 96.28, 96.31, 96.59,
                         96.68, 96.79, 96.84, 96.84, 97.19, 97.08, 97.07),
    ("pow10", "vanilla"): (15.99, 20.76, 22.18, 29.29, 35.94, 42.01, 47.13, 51.07, 55.28, 60.33, 63.98, 67.86, 71.67,
                           75.04, 77.56, 80.32, 82.10, 83.91, 85.05, 86.24),
}
PAPER_DLRT_VS_UV_STD = {
    ("one", "fixed"): (6.95, 1.49, 0.91, 0.59, 0.45, 0.44, 0.44, 0.35, 0.23, 0.28, 0.28, 0.20, 0.21, 0.14, 0.13, 0.17,
                       0.15, 0.17, 0.14, 0.15),
    ("one", "vanilla"): (10.05, 16.11, 12.75, 12.38, 10.69, 7.01, 5.27, 4.54, 3.89, 3.44, 3.11, 2.85, 2.41, 2.21, 2.04,
                         1.94, 1.82, 1.69, 1.58, 1.47),
    ("pow2", "fixed"): (17.63, 5.30, 2.14, 1.06, 0.69, 0.77, 0.41, 0.39, 0.59, 0.58, 0.43, 0.40, 0.39, 0.57, 0.41, 0.41,
                        0.36, 0.41, 0.45, 0.30),
    ("pow2", "vanilla"): (4.75, 6.59, 12.26, 17.60, 20.13, 15.02, 11.31, 10.24, 8.82, 7.96, 6.99, 5.93, 4.98, 4.11, 3.54,
                          3.34, 3.04, 2.81, 2.74, 2.60),
    ("pow10", "fixed"): (18.40, 6.39, 2.04, 1.41, 1.05, 0.97, 0.74, 0.43, 0.60, 0.56, 0.57, 0.60, 0.56, 0.46, 0.64,
                         0.63, 0.65, 0.40, 0.42, 0.69),
    ("pow10", "vanilla"): (3.61, 1.29, 1.06, 6.18, 6.59, 6.70, 10.40, 12.12, 13.23, 13.51, 13.36, 12.73, 11.37, 9.95,
                           8.72, 7.17, 6.55, 5.75, 5.27, 4.81),
}
PAPER_DLRT_VS_UV = {key: curve[-1] for key, curve in PAPER_DLRT_VS_UV_MEAN.items()}  # the paper's final numbers
# The initial spectra of the DLRT vs U V^T comparison: σ_k = d^-k (k = 0, 1, ...) for each one's d, and the
# decay as the paper writes it
SPECTRA = {"one": 1.0, "pow2": 2.0, "pow10": 10.0}
SPECTRUM_LABELS = {name: "1" if d == 1 else f"{d:g}^-k" for name, d in SPECTRA.items()}


def parse_ranks(ranks: str) -> list[int]:
    """'[9,16,28,10]' -> [9, 16, 28, 10]."""
    return [int(r) for r in ranks.strip("[]").split(",")]


# The ranks the paper reports, for the benchmarks' cases: LeNet5 at ϑ = 0.15, the FC net (w = 500) at ϑ = 0.09.
LENET5_RANKS_AT_0_15 = parse_ranks(PAPER_LENET5[0.15][1])[:3]  # without the dense output layer's 10
FC500_RANKS_AT_0_09 = parse_ranks(PAPER_FC[500][0.09][1])


# ---------------------------------------------------------------------------------------------
# the paper's tables: what each compares our runs against
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableProtocol:
    """The paper's protocol for one table: what a table header compares our runs against."""

    text: str
    settings: dict  # config key -> the paper's value, for every method
    settings_by_method: dict = field(default_factory=dict)  # method -> {config key: value} on top
    runs_per_row: int | None = None  # None: the paper does not say
    selection: str = "min_val_loss"  # the epoch a run is read at (the config's `selection`)

    def expected(self, method: str) -> dict:
        return {**self.settings, "selection": self.selection, **self.settings_by_method.get(method, {})}


def recipe_settings(model: str) -> dict:
    """A recipe as the config keys a table checks our runs against."""
    recipe = RECIPES[model]
    return {"epochs": recipe.epochs, "lr": recipe.lr, "batch_size": recipe.batch_size, "optim.name": recipe.optim,
            "data.name": "mnist", "data.split": recipe.split, "data.subset": None}


LENET5_DENSE_EPOCHS = 10
LENET5 = TableProtocol(
    f"SGD lr 0.05, batch 128, 20 epochs (dense: {LENET5_DENSE_EPOCHS}), paper split of the 70k MNIST images, the "
    "authors' initial factors, 5 runs per row, each read at its epoch of minimum validation loss",
    recipe_settings("lenet5"), {"dense": {"epochs": LENET5_DENSE_EPOCHS}}, runs_per_row=5)
FC = TableProtocol(
    "Adam lr 1e-3, batch 256, 50k/10k/10k split, 250 rank-adaptive epochs then 100 fixed-rank epochs at the final "
    "ranks; each run read at its final epoch (the accuracy after the fine-tuning, the ranks of the adaptive phase's "
    "end), as the paper's FC table and the authors' logs do (results/ERRATA.md, finding 4); the paper does not say "
    "how many runs its FC table averages",
    recipe_settings("fc"), {"adaptive": {"finetune.epochs": RECIPES["fc"].finetune_epochs}}, selection="final")
_UV = {"epochs": 20, "lr": 0.01, "batch_size": 128, "model.rank": 20, "data.name": "mnist", "data.subset": None}
DLRT_VS_UV = TableProtocol(
    "LeNet5 at rank 20, SGD lr 0.01, batch 128, 20 epochs, 10 runs; our setup: every layer factorised and trained, "
    "σ_k = d^-k, the paper split", {**_UV, "data.split": "paper"}, runs_per_row=10)
DLRT_VS_UV_AUTHORS = TableProtocol(
    "the authors' setup: LeNet5 at rank 20, σ_k = s_k d^-k (s: sorted |N(0,1)| draws), 60 000 training and 10 000 test "
    "images (no validation set), the final epoch, SGD lr 0.01, batch 128, 20 epochs, 10 runs; their U V^T baseline "
    "keeps the convs frozen", {**_UV, "model.init": "authors", "data.split": "train_test"}, runs_per_row=10,
    selection="final")


# ---------------------------------------------------------------------------------------------
# the runs that make the tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """Runs of one table: `dlrt-run -m experiment=<experiment> <fixed> <grid>`, every combination of the grid."""

    experiment: str
    grid: dict  # config key -> the values swept, in order
    fixed: dict = field(default_factory=dict)  # overrides every run of the sweep takes
    cost: str = ""  # why it comes last (and may stay not run), where it does

    def runs(self) -> list[dict]:
        """Each run's overrides, experiment first, seed by seed: a queue stopped part way leaves every row or curve
        of the table with as many seeds as the next, give or take one."""
        loops = sorted(self.grid, key=lambda key: key != "seed")  # the seed loop outermost
        runs = []
        for values in itertools.product(*(self.grid[key] for key in loops)):
            chosen = dict(zip(loops, values))
            runs.append({"experiment": self.experiment, **self.fixed, **{key: chosen[key] for key in self.grid}})
        return runs

    def command(self) -> str:
        """The dlrt-run command of the whole sweep."""
        args = [f"{key}={value}" for key, value in self.fixed.items()]
        args += [f"{key}={','.join(map(str, values))}" for key, values in self.grid.items()]
        return " ".join(["dlrt-run -m", f"experiment={self.experiment}", *args])


def _taus(paper: dict) -> tuple:
    return tuple(tau for tau in paper if tau != "dense")


SEEDS_LENET5 = tuple(range(LENET5.runs_per_row))
SEEDS_UV_AUTHORS = tuple(range(DLRT_VS_UV_AUTHORS.runs_per_row))
SEEDS_UV_OURS = tuple(range(5))  # half the paper's 10: our setup is a comparison of our own, not a paper row
FC_WIDTHS = tuple(PAPER_FC)
FC_TAUS = _taus(PAPER_FC[FC_WIDTHS[0]])

LENET5_DLRT = Sweep("lenet5_mnist", {"tau": _taus(PAPER_LENET5), "seed": SEEDS_LENET5})
LENET5_DENSE = Sweep("lenet5_mnist", {"seed": SEEDS_LENET5},
                     {"method": "dense", "tau": 0, **LENET5.settings_by_method["dense"]})
LENET5_SVD_INIT = Sweep("lenet5_mnist", {"tau": _taus(PAPER_LENET5), "seed": SEEDS_LENET5}, {"model.init": "svd"})
FC_DLRT = Sweep("fc_mnist", {"model.width": FC_WIDTHS, "tau": FC_TAUS[1:]})
FC_DENSE = Sweep("fc_mnist", {"model.width": FC_WIDTHS}, {"method": "dense", "tau": 0})
# ϑ = 0.03 keeps the ranks at their cap (half the width) and the step's SVDs at the full width: at width 500 about
# 54 s per epoch on the 2-core CPU with one thread (the archived 20 + 10 epoch run), some 5 hours for the 350 epochs,
# queued with the other paper rows; at width 784 the costliest run of all, queued last
FC500_AT_003 = Sweep("fc_mnist", {"model.width": (500,)}, {"tau": FC_TAUS[0]})
FC_AT_003 = Sweep("fc_mnist", {"model.width": (784,)}, {"tau": FC_TAUS[0]}, cost=(
    "its ranks stay at their cap (392), about 290 s per epoch on the 2-core CPU with one thread, some 28 hours for "
    "the 350 epochs"))
# The authors' FC procedure (experiment=fc_mnist_authors; results/ERRATA.md finding 4), width 500 at the ϑ of their
# logs, each adaptive phase as long as theirs: ϑ -> the rows of T@3f1aa0d illustration/paper_data/500Neurons/
# e2edense_sr350_v<ϑ>/historyLogs/history_001_.csv (each followed by 100 fine-tuning epochs, history_002_.csv)
FC_AUTHORS_EPOCHS = {0.17: 250, 0.15: 250, 0.13: 250, 0.11: 244, 0.09: 188, 0.07: 122, 0.05: 71, 0.03: 32}
FC_AUTHORS_PROTOCOL = TableProtocol(
    "the authors' FC procedure: the FC protocol at width 500 with Adam restarting at every step of the rank-adaptive "
    "phase (state_policy=restart) and keeping its moments in place in the fine-tuning (finetune.state_policy=keep), "
    "Keras's eps 1e-7, each adaptive phase stopped at the epoch of their log",
    {key: value for key, value in FC.settings.items() if key != "epochs"},  # each ϑ's own: FC_AUTHORS_EPOCHS
    FC.settings_by_method, selection=FC.selection)
FC_AUTHORS = tuple(Sweep("fc_mnist_authors", {}, {"tau": tau, "epochs": epochs}) for tau, epochs in FC_AUTHORS_EPOCHS.items())
FC_AUTHORS_FULL = Sweep("fc_mnist_authors", {"tau": tuple(tau for tau, epochs in FC_AUTHORS_EPOCHS.items()
                                                          if epochs == RECIPES["fc"].epochs)})
# Basis updates every k batches (issue 26): the cost of k in accuracy at a small and a large ϑ (k = 1 is LENET5_DLRT)
LENET5_BASIS_EVERY = Sweep("lenet5_mnist", {"method.basis_every": (10, 5, 30), "tau": (0.15, 0.4), "seed": (0, 1, 2)})
UV_AUTHORS = Sweep("dlrt_vs_uv_authors", {"method": ("fixed", "vanilla_frozen_convs"),
                                          "model.spectrum": tuple(SPECTRUM_LABELS), "seed": SEEDS_UV_AUTHORS})
UV_OURS = Sweep("dlrt_vs_uv", {"method": ("fixed", "vanilla"), "model.spectrum": tuple(SPECTRUM_LABELS),
                               "seed": SEEDS_UV_OURS})

# Every table's runs, in the order they are run: the dense LeNet5 row and the basis_every study first (15 minutes a
# run on this CPU), then the FC tables (about 100 s per epoch at their starting ranks, 350 epochs), the DLRT vs U V^T
# studies (ours first: its table has no run records yet, the authors' setup has 3 seeds of each curve), FC width 500
# at ϑ = 0.03, the LeNet5 rows, FC width 784 at ϑ = 0.03, the costliest by far, and the authors' FC procedure (ϑ
# descending: the cheap runs first).
SWEEPS = (LENET5_DENSE, LENET5_BASIS_EVERY, FC_DLRT, FC_DENSE, UV_OURS, FC500_AT_003, UV_AUTHORS, LENET5_DLRT,
          LENET5_SVD_INIT, FC_AT_003, *FC_AUTHORS)
# experiment -> its table's protocol and the sweep that `dlrt-run -m experiment=<name>` runs (its yaml reads it)
EXPERIMENTS = {"lenet5_mnist": (LENET5, LENET5_DLRT), "fc_mnist": (FC, FC_DLRT),
               "dlrt_vs_uv": (DLRT_VS_UV, UV_OURS), "dlrt_vs_uv_authors": (DLRT_VS_UV_AUTHORS, UV_AUTHORS),
               "fc_mnist_authors": (FC_AUTHORS_PROTOCOL, FC_AUTHORS_FULL)}
