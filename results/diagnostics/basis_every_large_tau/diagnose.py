"""Issue 26: why basis_every = k > 1 loses accuracy at a large ϑ (LeNet5 / MNIST, paper protocol, SGD lr 0.05).

One run trains LeNet5 (authors' init, paper split, batch 128, the harness's seeds) with the library's public API
and records, every --every batches, the test accuracy (fixed subset of the test set) of
  - the model as it trains ("untrunc": between basis steps the 2r x 2r core of the cycle; at k = 1 the truncated
    model, plus "aug": the k = 1 step's augmented core after its S-step, before its truncation),
  - a copy truncated as the epoch's end truncates it ("trunc": copy.deepcopy((model, opt)); opt.truncate()),
  - that truncated copy after --settle S-only SGD steps at its rank ("settled"),
and, at every truncation the training makes, the rank kept per layer, the fraction ‖σ_tail‖/‖σ‖ dropped per layer
and the loss of a fixed probe of training images just before and just after the truncation.

Variants (--variant), none of which edits the library:
  library      DLRTOptimizer(basis_every=k): truncate the trained 2r core, augment, S-step; k-1 S-steps between.
  cut_at_once  every k-th batch the paper's step (augment, S-step, truncate at once: basis_every=1), the k-1
               batches between plain SGD S-steps on the r x r core (U, V frozen): the new directions are judged
               after one step, as at k = 1, and no step trains directions that the next truncation drops.
  avg_dirs     the library's cycle, but the basis step takes its new directions (and the new-old blocks of its
               S-step) from the mean of G V, G^T U over the cycle's k batches, not from its own batch alone.
  inner_tau    the library's cycle with ϑ = --inner-tau and r_min = --inner-r-min at its basis steps, --tau and
               r_min = 2 only at the epoch's end (and in the truncated copies).

    PYTHONPATH=<dlrt snapshot> python diagnose.py --variant library --tau 0.4 --k 5 --epochs 2 --out DIR
    python diagnose.py --plot DIR      # figures and summary.csv from the run files in DIR
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.experiments.data.arrays import load_data
from dlrt.experiments.data.sharding import tensor_batches
from dlrt.experiments.models import build_model

BATCH, LR = 128, 0.05  # the paper's LeNet5 recipe (protocols.RECIPES["lenet5"])
R_MIN = 2  # method.r_min of the runner's adaptive method


def ranks(model) -> list[int]:
    return [layer.rank for layer in low_rank_layers(model)]


@torch.no_grad()
def evaluate(model, x, y, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) on (x, y)."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
    model.train()
    return loss / len(x), 100.0 * correct / len(x)


def deep_copy(model, opt, *more):
    """copy.deepcopy((model, opt, *more)) with the optimizer whole: torch.optim.Optimizer.__getstate__ keeps only
    defaults, state and param_groups, so copy.deepcopy(opt) of a DLRTOptimizer loses its method, layers and dense
    optimizer (the copy fails on its first step or truncate); its __dict__ is copied here instead."""
    model_c, attributes, *more_c = copy.deepcopy((model, opt.__dict__, *more))
    opt_c = object.__new__(type(opt))
    opt_c.__dict__.update(attributes)
    return (model_c, opt_c, *more_c)


def truncated_copy(model, opt, tau: float | None = None, r_min: int | None = None):
    """A copy of (model, opt) truncated as the epoch's end truncates (at ϑ = tau and r_min when given)."""
    model_c, opt_c = deep_copy(model, opt)
    for group in opt_c.low_rank_groups:
        group["tau"] = group["tau"] if tau is None else tau
        group["r_min"] = group["r_min"] if r_min is None else r_min
    opt_c.truncate()
    return model_c, opt_c


def s_only_sgd_step(model, opt, x, y, lr: float) -> float:
    """One plain SGD step on the cores S and the dense parameters, U and V left as they are."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for layer in low_rank_layers(model):
            layer.S -= lr * layer.S.grad
        for group in opt.dense_optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p -= lr * p.grad
    opt.zero_grad()
    return loss.item()


def settled_copy(model, opt, tau, r_min, batches, lr: float):
    """The truncated copy after len(batches) S-only SGD steps at its rank."""
    model_c, opt_c = truncated_copy(model, opt, tau, r_min)
    for x, y in batches:
        s_only_sgd_step(model_c, opt_c, x, y, lr)
    return model_c


def average_cycle_gradients(model, cycle: dict | None, basis: bool) -> dict | None:
    """avg_dirs: add this batch's G V, G^T U (U.grad, V.grad: the bases stay fixed through a cycle) to the cycle's
    sums; at a basis step give U.grad and V.grad the cycle's means, from which the step takes its new directions
    and the new-old blocks of its S-step (its S.grad and Ũ^T G Ṽ stay this batch's), and start afresh."""
    layers = low_rank_layers(model)
    grads = [(layer.U.grad, layer.V.grad) for layer in layers]
    if cycle is None:
        cycle = {"sums": [(u.clone(), v.clone()) for u, v in grads], "count": 1}
    else:
        cycle = {"sums": [(a + u, b + v) for (a, b), (u, v) in zip(cycle["sums"], grads)], "count": cycle["count"] + 1}
    if not basis:
        return cycle
    for layer, (u, v) in zip(layers, cycle["sums"]):
        layer.U.grad, layer.V.grad = u / cycle["count"], v / cycle["count"]
    return None


def tail_fractions(sigmas, kept) -> list[float]:
    return [(s[r:].norm() / s.norm()).item() for s, r in zip(sigmas, kept)]


def run(args) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # the order of train.train: seed, data, model
    data = load_data("mnist", args.data_root, "paper", args.seed)
    model = build_model("lenet5", data.input_shape, data.num_classes, low_rank=True, rank=None, init="authors")
    k_opt = args.k if args.variant in ("library", "inner_tau", "avg_dirs") else 1
    cycle_tau = args.inner_tau if args.variant == "inner_tau" else args.tau
    cycle_r_min = args.inner_r_min if args.variant == "inner_tau" else R_MIN
    opt = DLRTOptimizer(model, lr=LR, tau=cycle_tau, method="adaptive", optimizer="sgd", basis_every=k_opt,
                        r_min=cycle_r_min, layerwise=False)
    generator = torch.Generator().manual_seed(args.seed)
    test_x, test_y = data.test.x[:args.test_subset], data.test.y[:args.test_subset]
    probe = data.train.x[:args.probe], data.train.y[:args.probe]
    # the settling steps take fixed training batches, the same at every measurement
    settle_batches = [(data.train.x[i:i + BATCH], data.train.y[i:i + BATCH])
                      for i in range(args.probe, args.probe + BATCH * args.settle, BATCH)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{args.variant}_tau{args.tau}_k{args.k}" + (
        f"_inner{args.inner_tau}" if args.variant == "inner_tau" else "") + (
        f"_rmin{args.inner_r_min}" if args.variant == "inner_tau" and args.inner_r_min != R_MIN else "") + (
        f"_final{args.final_k1_epochs}k1" if args.final_k1_epochs else "")
    timeline, cuts = [], []
    step, loss_sum, loss_count, started = 0, 0.0, 0, time.time()

    def measure(epoch_end: bool) -> None:
        nonlocal loss_sum, loss_count
        row = {"step": step, "epoch": step / batches_per_epoch, "epoch_end": int(epoch_end),
               "train_loss_window": loss_sum / max(loss_count, 1), "ranks": " ".join(map(str, ranks(model)))}
        row["untrunc_loss"], row["untrunc_acc"] = evaluate(model, test_x, test_y)
        model_t, _ = truncated_copy(model, opt, args.tau, R_MIN)
        row["trunc_ranks"] = " ".join(map(str, ranks(model_t)))
        row["trunc_loss"], row["trunc_acc"] = evaluate(model_t, test_x, test_y)
        model_s = settled_copy(model, opt, args.tau, R_MIN, settle_batches, LR)
        row["settled_loss"], row["settled_acc"] = evaluate(model_s, test_x, test_y)
        row["aug_acc"] = aug_acc.pop("value", math.nan)
        row["trunc_acc_full_test"] = evaluate(model_t, data.test.x, data.test.y)[1] if epoch_end else math.nan
        row["seconds"] = time.time() - started
        timeline.append(row)
        loss_sum, loss_count = 0.0, 0
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    batches_per_epoch = math.ceil(len(data.train.x) / BATCH)
    cycle_grads = None
    aug_acc: dict = {}
    for epoch in range(args.epochs):
        if epoch == args.epochs - args.final_k1_epochs and opt.low_rank_groups[0]["basis_every"] > 1:
            # the last epochs take the paper's step at ϑ = --tau: truncate as the epoch's end does, then
            # DLRTOptimizer(basis_every=1) (plain SGD keeps no state to carry over)
            for group in opt.low_rank_groups:
                group["tau"], group["r_min"] = args.tau, R_MIN
            opt.truncate()
            opt = DLRTOptimizer(model, lr=LR, tau=args.tau, method="adaptive", optimizer="sgd", layerwise=False)
        for batch, (x, y, *_) in enumerate(tensor_batches(data.train.x, data.train.y, BATCH, generator), 1):
            basis = opt.low_rank_groups[0]["basis_clock"] == 0  # the library's next step truncates
            coefficient_only = args.variant == "cut_at_once" and step % args.k != 0
            if coefficient_only:
                loss = s_only_sgd_step(model, opt, x, y, LR)
            else:
                before = after = math.nan
                if basis and opt.low_rank_groups[0]["basis_every"] > 1 and not args.light:  # the cycle's truncation opens this step
                    before = evaluate(model, *probe)[0]
                    model_t, _ = truncated_copy(model, opt)
                    after = evaluate(model_t, *probe)[0]
                opt.zero_grad()
                averaging = args.variant == "avg_dirs" and opt.low_rank_groups[0]["basis_every"] > 1
                if averaging:  # G V and G^T U at the coefficient steps too (the library skips them there)
                    for layer in low_rank_layers(model):
                        layer.U.requires_grad_(True)
                        layer.V.requires_grad_(True)
                logits = model(x)
                loss_t = F.cross_entropy(logits, y)
                loss_t.backward()
                loss = loss_t.item()
                if averaging:
                    cycle_grads = average_cycle_gradients(model, cycle_grads, basis)
                plan = opt.prepare_step()  # DLRTOptimizer.step, taken in its two halves to read the SVDs
                new_ranks = plan.new_ranks.tolist() if plan.new_ranks is not None else None
                if plan.steps:
                    sigmas = [s.svd[1] for s in plan.steps]
                    sizes = [len(s) for s in sigmas]
                    if not plan.steps[0].in_cycle and not args.light:  # k = 1: the truncation ends this step
                        model_a, opt_a, plan_a = deep_copy(model, opt, plan)
                        opt_a.finish_step(plan_a, sizes)  # the same step, not truncated
                        before = evaluate(model_a, *probe)[0]
                        if (step + 1) % args.every == 0 and args.variant == "library":
                            aug_acc["value"] = evaluate(model_a, test_x, test_y)[1]
                opt.finish_step(plan, new_ranks)
                opt.schedule_next_step()
                if plan.steps:
                    if not plan.steps[0].in_cycle and not args.light:
                        after = evaluate(model, *probe)[0]
                    for i, (sigma, r1) in enumerate(zip(sigmas, new_ranks)):
                        cuts.append({"step": step, "epoch": step / batches_per_epoch, "layer": i, "size": sizes[i],
                                     "kept": r1, "tail_frac": tail_fractions([sigma], [r1])[0],
                                     "sigma_norm": sigma.norm().item(), "probe_loss_before": before,
                                     "probe_loss_after": after})
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {step}")
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            step += 1
            if step % args.every == 0:
                measure(False)
            if batch == args.max_steps:
                break
        measure(True)
    write_csv(out / f"timeline_{name}.csv", timeline)
    write_csv(out / f"truncations_{name}.csv", cuts)
    (out / f"config_{name}.json").write_text(json.dumps(vars(args), indent=1))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=("library", "cut_at_once", "inner_tau", "avg_dirs"), default="library")
    parser.add_argument("--tau", type=float, default=0.4)
    parser.add_argument("--inner-tau", type=float, default=0.15)
    parser.add_argument("--inner-r-min", type=int, default=R_MIN, help="inner_tau: r_min at the cycle's basis steps")
    parser.add_argument("--final-k1-epochs", type=int, default=0,
                        help="the last epochs at basis_every=1 and ϑ = --tau (after a truncation)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--probe", type=int, default=512, help="training images whose loss each truncation changes")
    parser.add_argument("--settle", type=int, default=10, help="S-only steps of the 'settled' copy")
    parser.add_argument("--data-root", default="/work/runs-wt/data")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (a smoke test)")
    parser.add_argument("--light", action="store_true",
                        help="no probe losses around the truncations and no k = 1 copies before them (4x faster at k = 1)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--plot", metavar="DIR", help="make the figures and summary of the runs in DIR, train nothing")
    args = parser.parse_args()
    if args.plot:
        from plots import plot_all
        plot_all(Path(args.plot))
    else:
        run(args)


if __name__ == "__main__":
    main()
