"""The published code's rank-adaptive LeNet5 on dlrt's data: the runs behind the LeNet5 offset (results/ERRATA.md).

The published code (COMPiLELab/DLRT-Net) is read from a git clone of it (`--repo`, a checkout or a bare repository):
models_folder/Lenet5.py with the layers of optimizer_KLS/ (my_conv.py, Linear_layer_lr_new.py) and their
rank-adaptive dlr_opt (optimizer_KLS/dlrt_optimizer.py), trained with the step of train_dlrt
(optimizer_KLS/train_custom_optimizer.py) as Lenet_experiment/run_lenet_mnist.py calls it: SGD lr 0.05, batch 128,
20 epochs, ϑ relative to ‖σ‖, their initial factors. The data are those of `experiment=lenet5_mnist`: the paper
split of the 70k pooled images drawn from the seed (dlrt.experiments.data, split=paper: 50k / 10k / 10k). Each epoch
is evaluated as dlrt-run evaluates (losses and accuracies over all images), and the run's epoch is the one of
minimum validation loss, the paper's rule.

    D=results/diagnostics/lenet5_published_adaptive   # this script's folder, from the repository's root
    # one run, resumable: OUT/lenet5-published-adaptive-tau0.13-seed0/{epochs.csv, summary.json}
    python $D/published_adaptive.py train --repo DLRT-Net --tau 0.13 --seed 0 --out OUT --threads 1
    # their step and dlrt's method=adaptive from the same initial factors on the same batches, side by side
    python $D/published_adaptive.py same-start --repo DLRT-Net --tau 0.13 --seed 0 --steps 100
    # per ϑ: the paper's result files, their code here and dlrt's runs, each at its epoch of minimum val loss
    python $D/published_adaptive.py summary --repo DLRT-Net --published OUT --dlrt results/runs/lenet5_mnist
"""

import argparse
import io
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# their fixed-rank code's loader and same-start loop live beside the fixed-rank finding's results (ERRATA finding 2)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dlrt_vs_uv_sigma1"))
from published_fixed_rank import CLASSIFIER, LOW_RANK_LAYERS, import_published, paired_steps, their_step
from dlrt import DLRTOptimizer
from dlrt.experiments.data import load_data
from dlrt.experiments.models import build_model
from dlrt.experiments.protocols import PAPER_LENET5
from dlrt.experiments.provenance import CODE_VERSION
from dlrt.experiments.run_folder import RunFolder
from dlrt.report.runs import mean_std

ADAPTIVE_FILES = ["models_folder/Lenet5.py", "optimizer_KLS/__init__.py", "optimizer_KLS/my_conv.py",
                  "optimizer_KLS/Linear_layer_lr_new.py", "optimizer_KLS/dlrt_optimizer.py"]
FIXES = ("rotation", "tail")  # the defects of their truncation that `--fix` can fix
THEIR_RESULTS = "Lenet_experiment/results_Lenet5/_running_data_{tau:g}_{run}.csv"  # 5 runs per ϑ, epochs from 0
BATCH, LR, EPOCHS = 128, 0.05, 20  # Lenet_experiment/run_lenet_mnist.py's defaults
EVAL_CHUNK = 1000


def adaptive_code(repo: str, fixes: tuple[str, ...] = ()):
    """Their rank-adaptive Lenet5 and dlr_opt (they import each other as packages from the repository's top), the
    optimizer with the named defects of its truncation fixed (`fixed_truncation`)."""
    lenet5, optimizer = import_published(repo, ADAPTIVE_FILES, ["models_folder.Lenet5", "optimizer_KLS.dlrt_optimizer"])
    dlr_opt = optimizer.dlr_opt
    if fixes:
        dlr_opt = type("dlr_opt_fixed", (dlr_opt,), {"S_postprocess_step": fixed_truncation(fixes)})
    return lenet5.Lenet5, dlr_opt


def fixed_truncation(fixes: tuple[str, ...]):
    """Their S_postprocess_step (optimizer_KLS/dlrt_optimizer.py:193-226), line for line, with `fixes` applied:
    "rotation": V1 = V̂ Q[:, :r1], the first columns of Q for S = P Σ Qᵀ, where theirs takes V̂ Qᵀ[:, :r1];
    "tail": the smallest r1 whose tail (σ_{r1+1}, …, σ_2r) is ≤ ϑ‖σ‖, else 2r (PAPER.md §1), where theirs leaves
    σ_2r out of every tail and keeps the old rank r when no cut qualifies."""
    @torch.no_grad()
    def S_postprocess_step(self):
        for layer in self.NN.layer:
            if not getattr(layer, "lr", False) or layer.fixed:
                continue
            size = 2 * layer.dynamic_rank
            P, sigma, Qt = torch.linalg.svd(layer.S_hat[:size, :size].clone())
            tolerance = self.theta * torch.linalg.norm(sigma)
            if "tail" in fixes:
                tails = sigma.flip(0).square().cumsum(0).flip(0).sqrt()  # tails[k] = ‖σ_{k+1..2r}‖
                rank = next((k for k in range(size) if tails[k] <= tolerance), size)
            else:
                rank = next((j for j in range(size - 1) if torch.linalg.norm(sigma[j:size - 1]) < tolerance),
                            layer.dynamic_rank)
            rank = max(min(rank, layer.rmax), 2)
            layer.S_hat[:rank, :rank] = torch.diag(sigma[:rank])
            layer.U[:, :rank] = layer.U_hat[:, :size] @ P[:, :rank]
            layer.V[:, :rank] = layer.V_hat[:, :size] @ (Qt[:rank].T if "rotation" in fixes else Qt[:, :rank])
            layer.dynamic_rank = int(rank)

    return S_postprocess_step


def run_name(tau: float, seed: int | str, fixes: tuple[str, ...] = ()) -> str:
    """The run's folder name; seed "" gives the prefix of every seed's."""
    return f"lenet5-published-adaptive{''.join(f'-fix-{fix}' for fix in sorted(fixes))}-tau{tau:g}-seed{seed}"


def published_commit(repo: str) -> str:
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def their_ranks(model) -> list[int]:
    return [model.layer[i].dynamic_rank for i in LOW_RANK_LAYERS]


@torch.no_grad()
def evaluate(model, split) -> tuple[float, float]:
    """Mean loss and accuracy (%) over all images, in the K-step forward, W = K Vᵀ = U S Vᵀ (as their loop does)."""
    loss, correct = 0.0, 0
    for start in range(0, len(split.y), EVAL_CHUNK):
        x, y = split.x[start:start + EVAL_CHUNK], split.y[start:start + EVAL_CHUNK]
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(split.y), 100 * correct / len(split.y)


def selected(rows: list[dict]) -> dict:
    """The epoch of minimum validation loss (the first of equal ones)."""
    return min(rows, key=lambda row: row["val_loss"])


def train(args) -> None:
    folder = RunFolder(Path(args.out) / run_name(args.tau, args.seed, args.fix))
    if (summary := folder.summary()) is not None:
        if summary["epochs"] < args.epochs:
            sys.exit(f"{folder} finished {summary['epochs']} epochs and kept no checkpoint: delete the folder to "
                     f"train {args.epochs}")
        print(f"{folder}: finished already (epoch {summary['selected_epoch']} selected)")
        return
    Lenet5, dlr_opt = adaptive_code(args.repo, args.fix)
    data = load_data(args.data, root=args.data_root, split="paper", seed=args.seed, subset=args.subset)
    torch.manual_seed(args.seed)  # their initial factors are drawn from torch's global generator
    model = Lenet5(device="cpu")
    optimizer = dlr_opt(model, tau=LR, theta=args.tau, KLS_optim=torch.optim.SGD)  # plain SGD keeps no state
    order_generator = torch.Generator().manual_seed(args.seed)
    rows = []
    with folder.claim():
        if folder.file("checkpoint.pt").exists():  # the factors' buffers and the ranks are all of their state
            state = folder.load("checkpoint.pt")
            model.load_state_dict(state["model"])
            for i, rank in zip(LOW_RANK_LAYERS, state["ranks"]):
                model.layer[i].dynamic_rank = rank
            order_generator.set_state(state["order"])
            rows = state["rows"]
            print(f"{folder}: resumed after epoch {len(rows)}, ranks {state['ranks']}", flush=True)
        x, y = data.train.x, data.train.y
        for epoch in range(len(rows) + 1, args.epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(len(y), generator=order_generator)
            starts = list(range(0, len(y), BATCH))[:args.steps]
            loss_sum = 0.0
            for start in starts:
                batch = order[start:start + BATCH]
                loss_sum += their_step(model, optimizer, x[batch], y[batch]) * len(batch)
            seen = min(len(y), starts[-1] + BATCH)
            optimizer.preprocess_step()  # K = U S for the evaluation's forward, as their loop does after an epoch
            model.update_step()
            trained = time.perf_counter() - started
            val_loss, val_acc = evaluate(model, data.val)
            test_loss, test_acc = evaluate(model, data.test)
            ranks = their_ranks(model)
            rows.append({"epoch": epoch, "steps": len(starts), "train_loss": loss_sum / seen, "val_loss": val_loss,
                         "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                         "ranks": " ".join(map(str, ranks)), **{f"rank_{i}": r for i, r in enumerate(ranks)},
                         "epoch_time_s": trained, "eval_time_s": time.perf_counter() - started - trained})
            folder.write_epochs(rows)
            folder.save("checkpoint.pt", {"model": model.state_dict(), "ranks": ranks,
                                          "order": order_generator.get_state(), "rows": rows})
            row = rows[-1]
            print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f} val loss {val_loss:.4f} "
                  f"val acc {val_acc:.2f} test acc {test_acc:.2f} ranks {ranks} ({trained:.0f} s + "
                  f"{row['eval_time_s']:.0f} s eval)", flush=True)
        best = selected(rows)
        folder.write_summary({
            "status": "completed", "code": f"published: COMPiLELab/DLRT-Net at {published_commit(args.repo)}",
            "selected_epoch": best["epoch"], "selection": "minimum validation loss", "selected": best,
            "final": rows[-1], "model": "lenet5", "data": args.data, "split": "paper", "tau": args.tau,
            "seed": args.seed, "fixes": sorted(args.fix), "epochs": len(rows), "max_steps_per_epoch": args.steps,
            "lr": LR, "batch_size": BATCH,
            "seconds_per_epoch": sum(row["epoch_time_s"] for row in rows) / len(rows),
            "device": f"CPU, {torch.get_num_threads()} thread(s)", "torch": torch.__version__,
            "code_version": CODE_VERSION, "command": " ".join(sys.argv)})
        folder.file("checkpoint.pt").unlink()  # a finished run needs no weights, and none are committed
    print(f"{folder}: epoch {best['epoch']} selected: test acc {best['test_acc']:.2f}, ranks [{best['ranks']}]")


def dlrt_at(theirs) -> torch.nn.Module:
    """dlrt's LeNet5 at their model's current factors, biases and classifier."""
    ours = build_model("lenet5", (1, 28, 28), 10, rank=None, init="authors")
    with torch.no_grad():
        for i in LOW_RANK_LAYERS:
            layer, r = theirs.layer[i], theirs.layer[i].dynamic_rank
            ours[i].set_factors(layer.U[:, :r].clone(), layer.S_hat[:r, :r].clone(), layer.V[:, :r].clone())
            ours[i].bias.copy_(layer.bias)
        ours[CLASSIFIER].weight.copy_(theirs.layer[CLASSIFIER].weight)
        ours[CLASSIFIER].bias.copy_(theirs.layer[CLASSIFIER].bias)
    return ours


def same_start(args) -> None:
    """Their model and dlrt's from the same factors, biases and classifier, on the same batches."""
    Lenet5, dlr_opt = adaptive_code(args.repo, args.fix)
    data = load_data(args.data, root=args.data_root, split="paper", seed=args.seed, subset=args.subset)
    torch.manual_seed(args.seed)
    theirs = Lenet5(device="cpu")
    ours = dlrt_at(theirs)
    their_optimizer = dlr_opt(theirs, tau=LR, theta=args.tau, KLS_optim=torch.optim.SGD)
    our_optimizer = DLRTOptimizer(ours, lr=LR, tau=args.tau, method="adaptive")
    print("step  loss (theirs)  loss (dlrt)  ranks (theirs)  ranks (dlrt)  "
          "|W_dlrt - W_theirs| / |W_theirs|: conv1 conv2 fc1 classifier")
    for step, their_loss, our_loss in paired_steps(theirs, their_optimizer, ours, our_optimizer, data, args):
        with torch.no_grad():
            diffs = []
            for i in LOW_RANK_LAYERS + (CLASSIFIER,):
                layer = theirs.layer[i]
                if i == CLASSIFIER:
                    w_theirs, w_ours = layer.weight, ours[i].weight
                else:
                    r = layer.dynamic_rank
                    w_theirs = layer.U[:, :r] @ layer.S_hat[:r, :r] @ layer.V[:, :r].T
                    w_ours = ours[i].dense_weight().flatten(1)
                diffs.append(f"{float((w_ours - w_theirs).norm() / w_theirs.norm()):.1e}")
        print(f"{step:4d}  {their_loss:13.5f}  {our_loss:11.5f}  {str(their_ranks(theirs)):>14}  "
              f"{str(our_optimizer.ranks()):>12}  {' '.join(diffs)}", flush=True)


def their_files_rows(repo: str, tau: float) -> list[tuple[float, str]]:
    """(test acc, ranks) of the authors' result files at their epoch of minimum validation loss."""
    import pandas as pd

    rows = []
    for run in range(5):
        read = subprocess.run(["git", "-C", repo, "show", f"HEAD:{THEIR_RESULTS.format(tau=tau, run=run)}"],
                              capture_output=True, text=True)
        if read.returncode == 0:
            frame = pd.read_csv(io.StringIO(read.stdout))
            best = frame.loc[frame["validation_loss"].idxmin()]
            rows.append((float(best["test_accuracy(%)"]), f"r{run}: {best['ranks'].strip('[]').replace(',', '')}"))
    return rows


def folder_rows(folder: str, prefix: str) -> list[tuple[float, str]]:
    """(test acc, "s<seed>: ranks") of the finished MNIST runs <prefix><seed> in `folder`, at their selected epoch."""
    rows = []
    for path in sorted(Path(folder).glob(f"{prefix}*")):
        summary = RunFolder(path).summary() if re.fullmatch(r"\d+", path.name[len(prefix):]) else None
        if (summary is not None and summary["status"] == "completed" and summary["data"] == "mnist"
                and not summary.get("max_steps_per_epoch")):  # whole epochs on MNIST only, not the checks
            rows.append((float(summary["selected"]["test_acc"]), f"s{summary['seed']}: {summary['selected']['ranks']}"))
    return rows


def summary(args) -> None:
    """One row per source and ϑ: test accuracy mean ± std and each run's ranks, at the epoch of minimum val loss."""
    print("| ϑ | runs of | n | test acc | ranks of each run (conv1 conv2 fc1) |")
    print("|---|---|---|---|---|")
    for tau in args.tau:
        sources = {
            "the paper's table": None,
            "the authors' result files": their_files_rows(args.repo, tau),
            "their code here": folder_rows(args.published, run_name(tau, "")),
            **{f"their code, {' and '.join(fixes)} fixed": folder_rows(args.published, run_name(tau, "", fixes))
               for fixes in (("rotation",), ("tail",), ("rotation", "tail"))},
            "dlrt, authors' init": folder_rows(args.dlrt, f"lenet5-mnist-adaptive-tau{tau:g}-seed"),
        }
        for label, rows in sources.items():
            if rows is None:
                acc, ranks = PAPER_LENET5[tau][:2]
                print(f"| {tau:g} | {label} | 5 | {acc} | {ranks} (the best run, with the classifier's 10) |")
                continue
            if not rows:  # a variant never run is left out
                continue
            mean, std = mean_std([acc for acc, _ in rows])
            acc = f"{mean:.2f}" if len(rows) == 1 else f"{mean:.2f} ± {std:.2f}"
            print(f"| {tau:g} | {label} | {len(rows)} | {acc} | {'; '.join(r for _, r in rows)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "same-start"):
        command = commands.add_parser(name)
        command.add_argument("--repo", required=True, help="a git clone of COMPiLELab/DLRT-Net (checkout or bare)")
        command.add_argument("--tau", type=float, required=True, help="ϑ, relative to ‖σ‖ of each S step")
        command.add_argument("--seed", type=int, default=0, help="draws the data split, their factors and the order")
        command.add_argument("--data", default="mnist", choices=["mnist", "synthetic"], help="synthetic: for checks")
        command.add_argument("--data-root", default="data")
        command.add_argument("--subset", type=int, default=None, help="keep the first N training images (checks)")
        command.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
        command.add_argument("--fix", nargs="+", default=(), choices=FIXES,
                             help="run their optimizer with these defects fixed (fixed_truncation)")
    train_command = commands.choices["train"]
    train_command.add_argument("--out", default="results/diagnostics/lenet5_published_adaptive")
    train_command.add_argument("--epochs", type=int, default=EPOCHS)
    train_command.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch (checks)")
    commands.choices["same-start"].add_argument("--steps", type=int, default=100, help="391 = one epoch")
    commands.choices["same-start"].add_argument("--every", type=int, default=10, help="print every this many steps")
    command = commands.add_parser("summary")
    command.add_argument("--repo", required=True, help="a git clone of COMPiLELab/DLRT-Net, for its result files")
    command.add_argument("--tau", type=float, nargs="+", default=[0.13, 0.4])
    command.add_argument("--published", default="results/diagnostics/lenet5_published_adaptive",
                         help="the folder of `train`'s runs")
    command.add_argument("--dlrt", default="results/runs/lenet5_mnist", help="the folder of dlrt-run's runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    {"train": train, "same-start": same_start, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
