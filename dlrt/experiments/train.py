"""The training loop: one run from a resolved config to a complete run folder (dlrt.experiments.run_folder).

A run has one or two phases (runtime.phases): the method's epochs, then, after adaptive or parallel, an optional
fine-tuning phase at the final ranks. After every epoch the folder gets the epoch's row, the checkpoint and, when
the epoch is the selected one so far, the model; an interrupted run resumes from the checkpoint.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from dlrt import low_rank_layers
from dlrt.metrics import parameter_report

from .data import load_device_data
from .devices import device_name, resolve_device
from .provenance import CODE_VERSION
from .run_folder import RunFolder
from .runtime import (Workers, autocast, configure_cpu, init_workers, make_graphed_step, make_model, make_optimizer,
                      make_scheduler, phases, rng_state, set_rng_state)
from .schema import RANK_ADAPTIVE, recorded

SELECTION_TEXT = {"min_val_loss": "minimum validation loss", "final": "final epoch"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, like KeyboardInterrupt: it ends a sweep, not only its job."""


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


@dataclass
class Evaluation:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model, batches: Iterable, precision: str = "fp32", workers: Workers | None = None) -> Evaluation:
    """Loss and accuracy over the batches; with `workers`, each worker's batches are its block of the set and the
    sums (loss, correct, count) are added over the workers in one collective, so every worker gets the numbers of
    the whole set. The sums stay on the device until the end: one host synchronisation, not one per batch."""
    model.eval()
    total_loss = correct = seen = None
    for x, y in batches:
        with autocast(x.device, precision):
            logits = model(x).float()
        sums = (F.cross_entropy(logits, y, reduction="sum").double(), (logits.argmax(1) == y).sum(), len(y))
        total_loss, correct, seen = sums if seen is None else (total_loss + sums[0], correct + sums[1], seen + sums[2])
    model.train()
    values = (0.0, 0, 0) if seen is None else (total_loss.item(), correct.item(), seen)
    total_loss, correct, seen = values if workers is None else workers.total(*values)
    if not seen:  # no validation set (data.split=train_test)
        return Evaluation(math.nan, math.nan)
    return Evaluation(total_loss / seen, 100.0 * correct / seen)


def plan_text(cfg: DictConfig) -> str:
    """'20 adaptive epochs', '1 dense epoch' or '250 adaptive epochs + 100 fixed fine-tuning epochs at the final
    ranks'."""
    parts = phases(cfg)
    text = f"{parts[0][2]} {parts[0][1]} {plural_epochs(parts[0][2])}"
    if len(parts) > 1:
        text += (f" + {parts[1][2]} {parts[1][1]} fine-tuning {plural_epochs(parts[1][2])} at the final ranks "
                 "(finetune.epochs=0: none)")
    return text


def plural_epochs(count: int) -> str:
    return "epoch" if count == 1 else "epochs"


def train(cfg: DictConfig, folder: RunFolder) -> dict:
    """Train as `cfg` says, recording into the folder; resume from its checkpoint if there is one."""
    device = resolve_device(cfg.device)
    workers = init_workers(device)
    configure_cpu(cfg)
    torch.manual_seed(cfg.seed)
    data = load_device_data(cfg, device, workers)
    model = make_model(cfg, data.input_shape, data.num_classes).to(device)
    schedule = [(phase, method) for phase, method, epochs in phases(cfg) for _ in range(epochs)]
    generator = torch.Generator().manual_seed(cfg.seed)
    rows, best, start, checkpoint = [], None, 0, None
    if folder.file("checkpoint.pt").exists():
        checkpoint = folder.load("checkpoint.pt", map_location=device)
        model.load_state_dict(checkpoint["model"])
        start, rows, best = checkpoint["epoch"] + 1, checkpoint["rows"], checkpoint["best"]
        set_rng_state(checkpoint["rng"], generator)
        print(f"resuming {folder} after epoch {start}", file=sys.stderr)
    elif workers.is_main:
        folder.write_config(recorded(cfg))
    phase_of = lambda epoch: schedule[epoch][1]
    optimizer = scheduler = graphed = None
    if start < len(schedule):
        same_phase = start > 0 and phase_of(start - 1) == phase_of(start)  # else the phase starts afresh
        optimizer, scheduler, graphed = _phase(cfg, model, phase_of(start), checkpoint if same_phase else None)
    if workers.is_main:
        tau = f"ϑ = {cfg.tau}, " if cfg.method.name in RANK_ADAPTIVE else ""  # no other method reads ϑ
        print(f"{cfg.model.name} on {cfg.data.name}: {plan_text(cfg)}, {tau}seed {cfg.seed}, on "
              f"{device_name(device)}", file=sys.stderr)
    started = time.time()
    with _StopSignals() as stop:
        for epoch in range(start, len(schedule)):
            if epoch > start and phase_of(epoch) != phase_of(epoch - 1):  # the fine-tuning phase starts
                optimizer, scheduler, graphed = _phase(cfg, model, phase_of(epoch))
            row = _train_and_evaluate(cfg, epoch, len(schedule), schedule[epoch][0], model, optimizer, scheduler,
                                      graphed, data, generator, workers, stop, folder, rows)
            rows.append(row)
            is_best = best is None or cfg.selection == "final" or row["val_loss"] < best["val_loss"]
            best = row if is_best else best
            if workers.is_main:
                _record_epoch(folder, model, optimizer, scheduler, generator, epoch, rows, best, is_best)
                print(_epoch_line(row, len(schedule), graphed), file=sys.stderr)
    summary = _summary(cfg, rows, best, device, workers, data, time.time() - started)
    if workers.is_main:
        folder.write_summary(summary)
    workers.close()
    return summary


def _phase(cfg, model, method: str, checkpoint: dict | None = None):
    """The optimizer, scheduler and graphed step of a phase, with the checkpoint's states when it resumes one."""
    optimizer = make_optimizer(cfg, model, method)
    scheduler = make_scheduler(cfg, optimizer)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
    return optimizer, scheduler, make_graphed_step(cfg, model, optimizer)


def _train_and_evaluate(cfg, epoch, total, phase, model, optimizer, scheduler, graphed, data, generator, workers,
                        stop, folder, rows) -> dict:
    epoch_start = time.time()
    bar = tqdm(data.train_batches(generator), total=data.batches_per_epoch, desc=f"epoch {epoch + 1}/{total}",
               leave=False, disable=not (cfg.progress and workers.is_main and sys.stderr.isatty()), file=sys.stderr)
    try:
        loss_sum, correct, seen = train_epoch(model, optimizer, bar, workers, stop, cfg.precision, graphed)
    except (TrainingDiverged, Interrupted) as e:
        kept = (f"the checkpoint of epoch {len(rows)} is kept in {folder}" if rows else
                f"no epoch had finished, so there is no checkpoint in {folder}")
        if isinstance(e, TrainingDiverged):
            if workers.is_main:
                folder.write_summary({"status": "failed", "reason": f"{e} in epoch {epoch + 1}",
                                      "epochs_completed": len(rows), "model": cfg.model.name,
                                      "method": cfg.method.name, "tau": cfg.tau, "seed": cfg.seed})
            raise TrainingDiverged(f"{e} in epoch {epoch + 1}; {kept}") from None
        raise Interrupted(f"{e} in epoch {epoch + 1}; {kept}: run the same command to "
                          f"{'resume' if rows else 'start again'}") from None
    optimizer.truncate()  # basis_every > 1: the epoch is evaluated, reported and checkpointed truncated
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    train_time = time.time() - epoch_start
    val = evaluate(model, data.eval_batches["val"](), cfg.precision, workers)
    test = evaluate(model, data.eval_batches["test"](), cfg.precision, workers)
    if scheduler is not None:
        scheduler.step(val.loss)
    ranks = [layer.rank for layer in low_rank_layers(model)]
    return {
        "epoch": epoch + 1, "phase": phase,
        "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
        "val_loss": val.loss, "val_acc": val.accuracy, "test_loss": test.loss, "test_acc": test.accuracy,
        "ranks": " ".join(map(str, ranks)), **{f"rank_{i}": r for i, r in enumerate(ranks)},
        **parameter_report(model),
        "lr": optimizer.lr, "epoch_time_s": train_time, "eval_time_s": time.time() - epoch_start - train_time,
    }


def _record_epoch(folder, model, optimizer, scheduler, generator, epoch, rows, best, is_best) -> None:
    folder.write_epochs(rows)
    if is_best:
        folder.save("best_model.pt", model.state_dict())
    folder.save("checkpoint.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                  "rows": rows, "best": best, "rng": rng_state(generator),
                                  "scheduler": None if scheduler is None else scheduler.state_dict()})


def _epoch_line(row: dict, total: int, graphed) -> str:
    line = (f"epoch {row['epoch']:3d}/{total} [{row['phase']}] train loss {row['train_loss']:.4f} val loss "
            f"{row['val_loss']:.4f} val acc {row['val_acc']:.2f} test acc {row['test_acc']:.2f} ranks [{row['ranks']}] "
            f"c.r. eval {row['cr_eval_honest']:.1f}% (paper conv. {row['cr_eval_paper']:.1f}%) {row['epoch_time_s']:.1f}s")
    if graphed is not None:
        c = graphed.counts
        line += f" (CUDA graphs so far: {c['replayed']} steps replayed, {c['captured']} captured, {c['eager']} eager)"
    return line


def _summary(cfg, rows, best, device, workers, data, seconds) -> dict:
    epochs = {phase: sum(1 for row in rows if row["phase"] == phase) for phase in ("train", "finetune")}
    return {
        "status": "completed",
        "selected_epoch": best["epoch"], "selection": SELECTION_TEXT[cfg.selection],
        "selected": best, "final": rows[-1],
        "model": cfg.model.name, "data": cfg.data.name, "method": cfg.method.name, "tau": cfg.tau, "seed": cfg.seed,
        "epochs": cfg.epochs, "finetune_epochs": epochs["finetune"],
        "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "seconds_per_epoch": sum(r["epoch_time_s"] for r in rows) / len(rows),
        "wall_time_s_this_session": seconds,
        "device": device_name(device), "torch": torch.__version__, "code_version": CODE_VERSION,
        "command": cfg_command(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "workers": workers.world_size,
    }


def cfg_command() -> str:
    """The command that reruns this run alone: the program and this job's overrides (a sweep's job included)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    program = "dlrt-run" if sys.argv[0].endswith("dlrt-run") else "python -m dlrt.experiments"
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (a test calling train directly)
        overrides = sys.argv[1:]
    return " ".join([program, *map(shlex.quote, overrides)])


def train_epoch(model, optimizer, batches: Iterable, workers: Workers, stop: _StopSignals,
                precision: str = "fp32", graphed=None):
    """One pass over this worker's batches; returns (loss sum, correct, seen) over all workers.

    A batch is a data.Batch (x, y, count, global_count) or a plain (x, y). Each worker's mean loss is weighted by
    its share of the global batch (Batch.loss_weight: 1 whenever the workers' shards are equal), so that the
    optimizer's average of the workers' gradients is the gradient of the global batch's mean loss; a stand-in
    batch (count 0) adds nothing. One host synchronisation per batch besides the optimizer's: the loss, checked
    inside the closure, before the step changes the factors (their SVD would fail on a NaN). With `graphed`, the
    steps are taken from CUDA graphs (dlrt.graphs), with the same check between the graphs.
    """
    loss_sum, seen = 0.0, 0
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    check = _LossCheck(workers)
    if graphed is not None:
        graphed.check_loss = check
    for batch in batches:
        xb, yb = batch[0], batch[1]
        count = batch[2] if len(batch) > 2 else len(yb)
        weight = batch.loss_weight(workers.world_size) if len(batch) > 2 else 1.0
        if graphed is None:
            first = {}

            def closure(xb=xb, yb=yb, weight=weight):  # the optimizer calls it (twice for method="fixed")
                optimizer.zero_grad()
                with autocast(device, precision):
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                check(loss.detach(), counts=count > 0)
                first.setdefault("logits", logits.detach())
                first.setdefault("loss", check.value)
                (loss if weight == 1 else loss * weight).backward()
                return loss

            optimizer.step(closure)
            logits, value = first["logits"], first["loss"]
        else:
            if weight != 1:
                raise RuntimeError("CUDA-graphed steps take whole batches of one process (cuda_graphs=true needs "
                                   "one process)")
            _, logits = graphed(xb, yb)
            value = check.value
        if stop.received:
            raise Interrupted(f"{stop.received} received")
        if count:
            loss_sum += value * count
            correct += (logits.argmax(1) == yb).sum()
            seen += count
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", ranks=optimizer.ranks(), refresh=False)
    return workers.total(loss_sum, correct.item(), seen)


class _LossCheck:
    """Stops a run whose loss is not finite on any worker, before the step changes the factors; keeps the value
    for the epoch's mean."""

    def __init__(self, workers: Workers):
        self.workers, self.value = workers, math.nan

    def __call__(self, loss: torch.Tensor, counts: bool = True) -> None:
        self.value = loss.item()
        checked = self.value if counts else 0.0  # a stand-in batch's loss is not the run's
        if not math.isfinite(self.workers.total(checked)[0]):  # all workers stop together
            raise TrainingDiverged(f"loss became {self.value}")
