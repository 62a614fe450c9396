"""The training loop: one run from a resolved config to a complete run folder.

A run folder holds
    config.yaml      the resolved config
    epochs.csv       one row per epoch: losses, accuracies, ranks, parameter counts, compression, times
    summary.json     the selected epoch (minimum validation loss, the paper's rule) and the run's facts
    checkpoint.pt    the latest epoch's model, optimizer and RNG states: an interrupted run resumes from it
    best_model.pt    the model at the selected epoch
Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .data import DataError, data_shape, iterate_batches, load_data
from .graphs import CudaGraphs, GraphedStep
from .image_data import IMAGE_DATASETS, IMAGE_SHAPES, load_image_data
from .layers import LowRankConv2d, low_rank_layers
from .metrics import parameter_report
from .models import ModelError, build_model, set_spectrum
from .optim import SVD_PLACES, DLRTOptimizer
from .provenance import CODE_VERSION

LOW_RANK_METHODS = ("adaptive", "parallel", "fixed", "vanilla", "vanilla_frozen_convs")
FINETUNE_METHODS = ("fixed", "s_only")
# Methods of the runner that DLRTOptimizer knows by another name: the dense net's parameters are stepped by
# its dense optimizer; the authors' U V^T baseline is vanilla training with the convs frozen (make_model).
OPTIMIZER_METHOD = {"dense": "adaptive", "vanilla_frozen_convs": "vanilla"}
SELECTIONS = ("min_val_loss", "final")


SELECTION_TEXT = {"min_val_loss": "minimum validation loss", "final": "final epoch"}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A run folder's checkpoint cannot be read."""


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT arrived; the last finished epoch's checkpoint is kept."""


class _StopSignals:
    """Turn SIGTERM/SIGINT into a flag checked after every batch, so no file is left half-written."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def validate(cfg: DictConfig) -> None:
    """Refuse bad values before any work is done."""
    method = cfg.method.name
    if not cfg.method.absolute_tau and not 0 <= cfg.tau < 1:
        raise ConfigError(f"tau={cfg.tau} is outside [0, 1): ϑ is relative to ‖σ‖ (or set method.absolute_tau=true)")
    if cfg.method.absolute_tau and cfg.tau < 0:
        raise ConfigError(f"tau={cfg.tau} must be >= 0")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        raise ConfigError(f"lr={cfg.lr} must be a positive number")
    if not isinstance(cfg.finetune.epochs, int) or cfg.finetune.epochs < 0:
        raise ConfigError(f"finetune.epochs={cfg.finetune.epochs} must be a non-negative integer")
    if cfg.finetune.method not in FINETUNE_METHODS:
        raise ConfigError(f"finetune.method={cfg.finetune.method} is unknown: choose one of {', '.join(FINETUNE_METHODS)}")
    if cfg.scheduler.name not in ("none", "plateau"):
        raise ConfigError(f"scheduler.name={cfg.scheduler.name} is unknown: choose none or plateau")
    if cfg.optim.name not in ("sgd", "adam"):
        raise ConfigError(f"optim.name={cfg.optim.name} is unknown: choose sgd or adam")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device} is unknown: choose auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision} is unknown: choose fp32 or bf16")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise ConfigError(f"threads={cfg.threads} must be a positive integer or null")
    if not isinstance(cfg.flush_denormal, bool):
        raise ConfigError(f"flush_denormal={cfg.flush_denormal} must be true or false")
    if cfg.data.subset is not None and (not isinstance(cfg.data.subset, int) or cfg.data.subset < 1):
        raise ConfigError(f"data.subset={cfg.data.subset} must be a positive integer or null")
    if method not in LOW_RANK_METHODS + ("dense",):
        raise ConfigError(f"method {method} is unknown: choose one of dense, {', '.join(LOW_RANK_METHODS)}")
    if method == "vanilla_frozen_convs" and (cfg.model.get("init") != "authors" or cfg.model.get("spectrum") is None):
        raise ConfigError("method=vanilla_frozen_convs is the published code's U V^T baseline: it needs "
                          "model.init=authors and a model.spectrum (one, pow2 or pow10)")
    if cfg.selection not in SELECTIONS:
        raise ConfigError(f"selection={cfg.selection} is unknown: choose one of {', '.join(SELECTIONS)}")
    no_validation = cfg.data.get("split") == "train_test"
    if no_validation and cfg.selection != "final":
        raise ConfigError("data.split=train_test has no validation set: set selection=final")
    if no_validation and cfg.scheduler.name == "plateau":
        raise ConfigError("scheduler.name=plateau steps on the validation loss, and data.split=train_test has none")
    if cfg.svd_on not in SVD_PLACES:
        raise ConfigError(f"svd_on={cfg.svd_on} is unknown: choose {', '.join(SVD_PLACES)}")
    if cfg.cuda_graphs not in (True, False):
        raise ConfigError(f"cuda_graphs={cfg.cuda_graphs} must be true or false")
    if cfg.cuda_graphs and method == "fixed":
        raise ConfigError("cuda_graphs=true cannot graph method=fixed (its step takes a second pass): "
                          "use adaptive, parallel or vanilla, or cuda_graphs=false")
    if cfg.cuda_graphs and cfg.precision != "fp32":
        raise ConfigError("cuda_graphs=true is for precision=fp32 only (autocast inside a graph is not tested)")
    if cfg.cuda_graphs and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("cuda_graphs=true runs in one process only for now: drop torchrun or set cuda_graphs=false")
    if cfg.cuda_graphs:
        graphs_backend(resolve_device(cfg.device))  # refuses a CPU
    try:  # build the model on the meta device: checks ranks and shapes without any arithmetic
        input_shape, num_classes = input_spec(cfg.data)
        with torch.device("meta"):
            make_model(cfg, input_shape, num_classes)
    except (ModelError, DataError) as e:
        raise ConfigError(str(e)) from None


def input_spec(data_cfg: DictConfig) -> tuple[tuple[int, ...], int]:
    """(input_shape, num_classes) of the configured data set, without loading it."""
    if data_cfg.name in IMAGE_DATASETS:
        return IMAGE_SHAPES[data_cfg.name]
    return data_shape(data_cfg.name, **_synthetic_options(data_cfg))


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if there is one; under torchrun each worker takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


@dataclass
class Workers:
    """This process's place in a data-parallel run (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: Iterable) -> Iterable:
        """Every worker draws the same global batch (same seed) and trains on its own slice of it."""
        for x, y in batches:
            yield x[self.rank :: self.world_size], y[self.rank :: self.world_size]

    def total(self, *values: float) -> list[float]:
        """Sums over the workers (for losses and counts that each worker has for its own shard)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def init_workers(device: torch.device) -> Workers:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Workers()
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Workers(dist.get_rank(), dist.get_world_size())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_csv(path: Path, rows: list[dict]) -> None:
    _atomic(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def save_torch(path: Path, obj) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model, batches: Iterable, precision: str = "fp32") -> Evaluation:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        with autocast(x.device, precision):
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    model.train()
    if not seen:  # no validation set (data.split=train_test)
        return Evaluation(math.nan, math.nan)
    return Evaluation(total_loss / seen, 100.0 * correct / seen)


@dataclass
class DeviceData:
    """Batches on the training device, whether the data set lives there whole or comes from loaders."""

    input_shape: tuple[int, ...]
    num_classes: int
    train_batches: Callable[[torch.Generator], Iterable]  # one epoch, shuffled
    batches_per_epoch: int
    eval_batches: dict[str, Callable[[], Iterable]]  # "val", "test"


def load_device_data(cfg: DictConfig, device: torch.device) -> DeviceData:
    data_cfg = cfg.data
    if data_cfg.name in IMAGE_DATASETS:
        loaders = load_image_data(data_cfg.name, data_cfg.root, cfg.seed, cfg.batch_size, cfg.eval_batch_size,
                                  data_cfg.workers, data_cfg.subset)
        to_device = lambda loader: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
        return DeviceData(loaders.input_shape, loaders.num_classes, lambda generator: to_device(loaders.train),
                          len(loaders.train), {"val": lambda: to_device(loaders.val), "test": lambda: to_device(loaders.test)})
    # Small data sets live on the device as one tensor; batches are index slices (DESIGN.md).
    data = load_data(data_cfg.name, data_cfg.root, data_cfg.split, cfg.seed, data_cfg.subset,
                     **_synthetic_options(data_cfg))
    tensors = {name: (split.x.to(device), split.y.to(device))
               for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    chunks = lambda x, y: ((x[i : i + cfg.eval_batch_size], y[i : i + cfg.eval_batch_size]) for i in range(0, len(x), cfg.eval_batch_size))
    return DeviceData(
        data.input_shape, data.num_classes,
        lambda generator: iterate_batches(*tensors["train"], cfg.batch_size, shuffle=True, generator=generator),
        math.ceil(len(data.train.x) / cfg.batch_size),
        {name: (lambda name=name: chunks(*tensors[name])) for name in ("val", "test")},
    )


def make_model(cfg: DictConfig, input_shape, num_classes: int):
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("name", "rank", "protocol")}
    rank = cfg.model.rank
    rank = list(rank) if OmegaConf.is_list(rank) else rank
    model = build_model(cfg.model.name, input_shape, num_classes,
                        low_rank=cfg.method.name != "dense", rank=rank, **options)
    if cfg.method.name == "vanilla_frozen_convs" and not next(model.parameters()).is_meta:
        freeze_convs_as_authors(model)
    return model


@torch.no_grad()
def freeze_convs_as_authors(model) -> None:
    """The published U V^T baseline (UV_vanilla/my_conv_vanilla.py): each low-rank conv's factors are built from
    √s of the sorted |N(0,1)| draws *before* the decay is applied, with requires_grad=False. So its convs are frozen
    random features at an undecayed spectrum, and only the linear layers' factors (and every bias) train."""
    convs = [layer for layer in low_rank_layers(model) if isinstance(layer, LowRankConv2d)]
    set_spectrum(model, "one", "authors", layers=convs)
    for layer in convs:
        for factor in (layer.U, layer.S, layer.V):
            factor.requires_grad_(False)


def make_optimizer(cfg: DictConfig, model, method: str) -> DLRTOptimizer:
    m = cfg.method
    return DLRTOptimizer(
        model, lr=cfg.lr, tau=cfg.tau, method=OPTIMIZER_METHOD.get(method, method),
        optimizer=cfg.optim.name, momentum=cfg.optim.momentum, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        absolute_tau=m.absolute_tau, r_min=m.r_min, r_max=m.r_max, state_policy=m.state_policy, svd_on=cfg.svd_on,
    )


def make_graphed_step(cfg: DictConfig, model, optimizer: DLRTOptimizer, device: torch.device) -> GraphedStep | None:
    """The CUDA-graphed training step when cuda_graphs=true and the optimizer's method can be graphed (a fixed
    fine-tuning phase runs eagerly)."""
    if not cfg.cuda_graphs or optimizer.method == "fixed":
        return None
    # a capture that fails (an operation this torch cannot capture) must not end the run: eager from there on
    return GraphedStep(model, optimizer, F.cross_entropy, graphs=graphs_backend(device), on_failure="eager")


def graphs_backend(device: torch.device) -> CudaGraphs:
    if device.type != "cuda":
        raise ConfigError("cuda_graphs=true needs a CUDA device (device=cuda): on a CPU a training step is not "
                          "bound by kernel launches, so there is nothing for graphs to save")
    return CudaGraphs()


def make_scheduler(cfg: DictConfig, optimizer: DLRTOptimizer):
    """ReduceLROnPlateau on the validation loss, stepped once per epoch (the paper's ImageNet protocol)."""
    if cfg.scheduler.name == "none":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.scheduler.factor, patience=cfg.scheduler.patience)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def configure_cpu(cfg: DictConfig) -> None:
    """torch's CPU threads, and whether subnormal floats are flushed to zero."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Subnormal floats (below 1.2e-38) take a slow path on x86 CPUs: once a dense FC net's training loss
    # neared 0, its epochs slowed from about 3 to 11 s. Flushing them changes only values below 1.2e-38.
    torch.set_flush_denormal(bool(cfg.flush_denormal))


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as `cfg` says, recording into run_dir; resume from its checkpoint if there is one."""
    device = resolve_device(cfg.device)
    workers = init_workers(device)
    configure_cpu(cfg)
    torch.manual_seed(cfg.seed)
    data = load_device_data(cfg, device)

    model = make_model(cfg, data.input_shape, data.num_classes).to(device)
    if workers.is_main:  # only rank 0 writes, and only once data and model are there
        run_dir.mkdir(parents=True, exist_ok=True)
    method = cfg.method.name
    finetune_epochs = cfg.finetune.epochs if method in ("adaptive", "parallel") else 0
    total_epochs = cfg.epochs + finetune_epochs
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(cfg, model, method)
    scheduler = make_scheduler(cfg, optimizer)
    rows, best, start_epoch = [], None, 0

    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        try:
            checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
            model.load_state_dict(checkpoint["model"])
        except Exception as e:
            raise CheckpointError(f"{checkpoint_path} cannot be resumed from ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                                  f"delete it to start this run afresh") from None
        start_epoch, rows, best = checkpoint["epoch"] + 1, checkpoint["rows"], checkpoint["best"]
        if start_epoch > cfg.epochs:  # interrupted in the fine-tuning phase
            optimizer = make_optimizer(cfg, model, cfg.finetune.method)
            scheduler = make_scheduler(cfg, optimizer)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"], generator)
        print(f"resuming {run_dir} after epoch {start_epoch}", file=sys.stderr)
    elif workers.is_main:
        _atomic(run_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))

    graphed = make_graphed_step(cfg, model, optimizer, device)
    plan = f"{cfg.epochs} {method} epochs" + (f" + {finetune_epochs} {cfg.finetune.method} fine-tuning epochs" if finetune_epochs else "")
    if workers.is_main:
        print(f"{cfg.model.name} on {cfg.data.name}: {plan}, ϑ = {cfg.tau}, seed {cfg.seed}, on {device_name(device)}", file=sys.stderr)
    started = time.time()
    with _StopSignals() as stop:
        for epoch in range(start_epoch, total_epochs):
            phase = "train" if epoch < cfg.epochs else "finetune"
            if epoch == cfg.epochs and finetune_epochs:
                optimizer = make_optimizer(cfg, model, cfg.finetune.method)
                scheduler = make_scheduler(cfg, optimizer)
                graphed = make_graphed_step(cfg, model, optimizer, device)
            epoch_start = time.time()
            bar = tqdm(workers.shard(data.train_batches(generator)), total=data.batches_per_epoch,
                       desc=f"epoch {epoch + 1}/{total_epochs}", leave=False,
                       disable=not (cfg.progress and workers.is_main), file=sys.stderr)
            try:
                loss_sum, correct, seen = train_epoch(model, optimizer, bar, workers, stop, cfg.precision, graphed)
            except (TrainingDiverged, Interrupted) as e:
                if isinstance(e, TrainingDiverged) and workers.is_main:
                    _record_failure(run_dir, cfg, rows, f"{e} in epoch {epoch + 1}")
                raise type(e)(f"{e} in epoch {epoch + 1}; the checkpoint of the last finished epoch is kept in "
                              f"{run_dir}" + ("" if isinstance(e, TrainingDiverged) else ": run the same command to resume")) from None
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time = time.time() - epoch_start
            val = evaluate(model, data.eval_batches["val"](), cfg.precision)
            test = evaluate(model, data.eval_batches["test"](), cfg.precision)
            if scheduler is not None:
                scheduler.step(val.loss)
            ranks = [layer.rank for layer in low_rank_layers(model)]
            row = {
                "epoch": epoch + 1, "phase": phase,
                "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                "val_loss": val.loss, "val_acc": val.accuracy, "test_loss": test.loss, "test_acc": test.accuracy,
                "ranks": " ".join(map(str, ranks)),
                **{f"rank_{i}": r for i, r in enumerate(ranks)},
                **parameter_report(model),
                "lr": optimizer.lr, "epoch_time_s": train_time, "eval_time_s": time.time() - epoch_start - train_time,
            }
            rows.append(row)
            is_best = best is None or cfg.selection == "final" or val.loss < best["val_loss"]
            best = row if is_best else best
            if not workers.is_main:
                continue
            write_csv(run_dir / "epochs.csv", rows)
            if is_best:
                save_torch(run_dir / "best_model.pt", model.state_dict())
            save_torch(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": epoch, "rows": rows, "best": best, "rng": _rng_state(generator),
                                         "scheduler": None if scheduler is None else scheduler.state_dict()})
            print(f"epoch {epoch + 1:3d}/{total_epochs} [{phase}] train loss {row['train_loss']:.4f} "
                  f"val loss {val.loss:.4f} val acc {val.accuracy:.2f} test acc {test.accuracy:.2f} "
                  f"ranks [{row['ranks']}] c.r. eval {row['cr_eval_honest']:.1f}% (paper conv. {row['cr_eval_paper']:.1f}%) "
                  f"{train_time:.1f}s" + (_graph_counts(graphed) if graphed is not None else ""), file=sys.stderr)

    summary = {
        "status": "completed",
        "selected_epoch": best["epoch"], "selection": SELECTION_TEXT[cfg.selection],
        "selected": best, "final": rows[-1],
        "model": cfg.model.name, "data": cfg.data.name, "method": method, "tau": cfg.tau, "seed": cfg.seed,
        "epochs": cfg.epochs, "finetune_epochs": finetune_epochs,
        "seconds_per_epoch": sum(r["epoch_time_s"] for r in rows) / len(rows),
        "wall_time_s_this_session": time.time() - started,
        "device": device_name(device), "torch": torch.__version__, "code_version": CODE_VERSION,
        "command": " ".join(sys.argv), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workers": workers.world_size,
    }
    if workers.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


def _graph_counts(graphed: GraphedStep) -> str:
    c = graphed.counts
    return f" (CUDA graphs so far: {c['replayed']} steps replayed, {c['captured']} captured, {c['eager']} eager)"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for forward and loss; the DLRT step (QR, SVD, truncation) always runs in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_epoch(model, optimizer: DLRTOptimizer, batches: Iterable, workers: Workers, stop: _StopSignals,
                precision: str = "fp32", graphed: GraphedStep | None = None):
    """One pass over the batches; returns (loss sum, correct, seen) over all workers.

    One host synchronisation per batch besides the optimizer's: the loss, checked before the step
    so that a NaN never reaches the factors (their SVD would fail on it). With `graphed`, the steps are
    taken from CUDA graphs (dlrt.graphs), with the same check between the graphs.
    """
    loss_sum, seen = 0.0, 0
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    check = _LossCheck(workers)
    if graphed is not None:
        graphed.check_loss = check
    for xb, yb in batches:
        def forward_backward(xb=xb, yb=yb):
            optimizer.zero_grad()
            with autocast(device, precision):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            loss.backward()
            return loss, logits

        if graphed is None:
            loss, logits = forward_backward()
            check(loss.detach())
            optimizer.step(lambda: forward_backward()[0])  # the closure: a second pass, for method="fixed"
        else:
            loss, logits = graphed(xb, yb)
        if stop.received:
            raise Interrupted(f"{stop.received} received")
        loss_sum += check.value * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{loss_sum / seen:.4f}", ranks=optimizer.ranks(), refresh=False)
    return workers.total(loss_sum, correct.item(), seen)


class _LossCheck:
    """Stops a run whose loss is not finite on any worker, before the step changes the factors; keeps the
    value for the epoch's mean."""

    def __init__(self, workers: Workers):
        self.workers, self.value = workers, math.nan

    def __call__(self, loss: torch.Tensor) -> None:
        self.value = loss.item()
        if not math.isfinite(self.workers.total(self.value)[0]):  # all workers stop together
            raise TrainingDiverged(f"loss became {self.value}")


def _record_failure(run_dir: Path, cfg: DictConfig, rows: list[dict], reason: str) -> None:
    write_json(run_dir / "summary.json", {"status": "failed", "reason": reason, "epochs_completed": len(rows),
                                          "model": cfg.model.name, "method": cfg.method.name, "tau": cfg.tau,
                                          "seed": cfg.seed})


def _synthetic_options(data_cfg: DictConfig) -> dict:
    if data_cfg.name != "synthetic":
        return {}
    keys = ("input_shape", "num_classes", "n_train", "n_val", "n_test")
    return {k: tuple(data_cfg[k]) if k == "input_shape" else data_cfg[k] for k in keys if k in data_cfg}
