"""The published code's fixed-rank DLRT on dlrt's data: the runs behind results/ERRATA.md, finding 2.

The published code (COMPiLELab/DLRT-Net) is read from a git clone of it (`--repo`, a checkout or a bare
repository): UV_vanilla/Lenet5_dlrt.py, my_conv_dlrt.py, Linear_layer_new_dlrt.py and
optimizer_KLS/dlrt_optimizer.py, run with the training loop of UV_vanilla/dlrt_factorization_run.py (SGD lr 0.01,
batch 128) on the authors' split of `experiment=dlrt_vs_uv_authors` (dlrt.experiments.data, split=train_test).

    D=results/diagnostics/dlrt_vs_uv_sigma1   # this script's folder, from the repository's root
    # their code for one epoch: the test accuracy, and the training loss every 50 steps (one JSON line)
    python $D/published_fixed_rank.py train --repo DLRT-Net --decay 1 --seed 0
    # their code and dlrt's method=fixed from the same initial factors on the same batches, side by side
    python $D/published_fixed_rank.py same-start --repo DLRT-Net --decay 1 --seed 0 --steps 469
    # epoch-1 accuracies of `train` JSON lines and of dlrt-run folders beside the paper's
    python $D/published_fixed_rank.py summary --published runs.jsonl --dlrt LABEL "RUN FOLDERS (a glob)" ...
"""

import argparse
import glob
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dlrt import DLRTOptimizer
from dlrt.experiments.data import load_data
from dlrt.experiments.models import build_model
from dlrt.experiments.protocols import PAPER_DLRT_VS_UV_MEAN, PAPER_DLRT_VS_UV_STD
from dlrt.experiments.run_folder import RunFolder
from dlrt.report.runs import mean_std

PUBLISHED_FILES = ["UV_vanilla/Lenet5_dlrt.py", "UV_vanilla/my_conv_dlrt.py", "UV_vanilla/Linear_layer_new_dlrt.py",
                   "optimizer_KLS/dlrt_optimizer.py"]
LOW_RANK_LAYERS = (0, 3, 7)  # the indices of the low-rank layers in their Lenet5.layer and in dlrt's lenet5
CLASSIFIER = 9
BATCH, LR = 128, 0.01


def import_published(repo: str, paths: list[str], modules: list[str], roots: tuple[str, ...] = ("",)) -> list:
    """`modules` of the published code, from `paths` of the repository's HEAD copied in their folders to a
    temporary folder; `roots` are its folders put on sys.path for the imports (their files import each other
    by plain names from their own folder, or as packages from the repository's top)."""
    with tempfile.TemporaryDirectory(prefix="dlrt-published-") as folder:
        for path in paths:
            read = subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True)
            if read.returncode != 0:
                sys.exit(f"--repo {repo}: cannot read {path} at HEAD ({read.stderr.strip()}); pass a git clone of "
                         "github.com/COMPiLELab/DLRT-Net")
            (Path(folder) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / path).write_text(read.stdout)
        search = [str(Path(folder) / root) for root in roots]
        sys.path[:0] = search
        try:
            return [importlib.import_module(name) for name in modules]
        finally:
            for entry in search:
                sys.path.remove(entry)


def fixed_rank_code(repo: str):
    """Their fixed-rank Lenet5 (UV_vanilla/) and dlr_opt."""
    lenet5, optimizer = import_published(repo, PUBLISHED_FILES, ["Lenet5_dlrt", "dlrt_optimizer"],
                                         roots=("UV_vanilla", "optimizer_KLS"))
    return lenet5.Lenet5, optimizer.dlr_opt


def their_step(model, optimizer, xb, yb) -> float:
    """One step as dlrt_factorization_run.py takes it: K and L passes, then the S pass in the closure."""
    criterion = torch.nn.CrossEntropyLoss()
    model.zero_grad()
    optimizer.zero_grad()
    optimizer.preprocess_step()
    loss, _ = model.populate_gradients(xb, yb, criterion)
    optimizer.step(closure=lambda: model.populate_gradients(xb, yb, criterion, step="S"))
    return float(loss)


def train(args) -> None:
    Lenet5, dlr_opt = fixed_rank_code(args.repo)
    data = load_data("mnist", root=args.data_root, split="train_test", seed=args.seed)
    torch.manual_seed(args.seed)
    model = Lenet5(device="cpu", decay=args.decay)
    optimizer = dlr_opt(model, tau=LR, theta=0.0, KLS_optim=torch.optim.SGD)
    order_generator = torch.Generator().manual_seed(args.seed)
    x, y = data.train.x, data.train.y
    losses, accuracies = [], []
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y), generator=order_generator)
        for step, start in enumerate(range(0, len(y), BATCH)):
            batch = order[start:start + BATCH]
            loss = their_step(model, optimizer, x[batch], y[batch])
            if step % 50 == 0:
                losses.append(round(loss, 4))
        optimizer.preprocess_step()  # K = U S for the evaluation's forward, as their loop does after an epoch
        model.update_step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(data.test.x[i:i + 1000]).argmax(1) == data.test.y[i:i + 1000]).sum())
                          for i in range(0, len(data.test.y), 1000))
        accuracies.append(100 * correct / len(data.test.y))
    print(json.dumps({"code": "published", "decay": args.decay, "seed": args.seed, "loss_every_50": losses,
                      "test_acc": accuracies}))


def same_start(args) -> None:
    Lenet5, dlr_opt = fixed_rank_code(args.repo)
    data = load_data("mnist", root=args.data_root, split="train_test", seed=args.seed)
    torch.manual_seed(args.seed)
    theirs = Lenet5(device="cpu", decay=args.decay)
    ours = build_model("lenet5", (1, 28, 28), 10, rank=20, init="authors")
    with torch.no_grad():  # their initial factors, biases and classifier, copied into dlrt's layers
        for i in LOW_RANK_LAYERS:
            ours[i].set_factors(theirs.layer[i].U.clone(), theirs.layer[i].S_hat.clone(), theirs.layer[i].V.clone())
            ours[i].bias.copy_(theirs.layer[i].bias)
        ours[CLASSIFIER].weight.copy_(theirs.layer[CLASSIFIER].weight)
        ours[CLASSIFIER].bias.copy_(theirs.layer[CLASSIFIER].bias)
    their_optimizer = dlr_opt(theirs, tau=LR, theta=0.0, KLS_optim=torch.optim.SGD)
    our_optimizer = DLRTOptimizer(ours, lr=LR, method="fixed")

    def weights(model, factors):
        return [factors(model, i) for i in LOW_RANK_LAYERS] + [factors(model, CLASSIFIER)]

    their_w = lambda m, i: m.layer[i].weight if i == CLASSIFIER else m.layer[i].U @ m.layer[i].S_hat @ m.layer[i].V.T
    our_w = lambda m, i: m[i].weight if i == CLASSIFIER else m[i].U @ m[i].S @ m[i].V.T
    print("step  loss (theirs)  loss (dlrt)  |W_dlrt - W_theirs| / |W_theirs|: conv1 conv2 fc1 classifier")
    for step, their_loss, our_loss in paired_steps(theirs, their_optimizer, ours, our_optimizer, data, args):
        with torch.no_grad():
            pairs = zip(weights(ours, our_w), weights(theirs, their_w))
            diffs = " ".join(f"{float((a - b).norm() / b.norm()):.1e}" for a, b in pairs)
        print(f"{step:4d}  {their_loss:13.5f}  {our_loss:11.5f}  {diffs}", flush=True)


def paired_steps(theirs, their_optimizer, ours, our_optimizer, data, args):
    """Their step and dlrt's on the same batches (the seed's order of the training set), `args.steps` of them;
    yields (step, their loss, our loss) at the steps to print: the first four, every `args.every`, the last."""
    x, y = data.train.x, data.train.y
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    for step in range(args.steps):
        batch = order[step * BATCH:(step + 1) * BATCH]
        xb, yb = x[batch], y[batch]
        their_loss = their_step(theirs, their_optimizer, xb, yb)
        first = []

        def closure():
            our_optimizer.zero_grad()
            loss = F.cross_entropy(ours(xb), yb)
            first.append(loss.item())
            loss.backward()
            return loss

        our_optimizer.step(closure)
        if step < 4 or step % args.every == 0 or step == args.steps - 1:
            yield step, their_loss, first[0]


def summary(args) -> None:
    """One row per label: the epoch-1 test accuracies, their mean ± sample std, and the paper's."""
    rows = {}
    for path in args.published:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            label = f"published code, decay {record['decay']:g}"
            rows.setdefault(label, []).append((record["seed"], record["test_acc"][0]))
    for label, pattern in args.dlrt:
        for folder in map(RunFolder, sorted(Path(p).parent for p in glob.glob(f"{pattern}/epochs.csv"))):
            first_epoch = folder.epochs().iloc[0]
            rows.setdefault(label, []).append((folder.summary()["seed"], float(first_epoch["test_acc"])))
    paper_mean, paper_std = PAPER_DLRT_VS_UV_MEAN[("one", "fixed")][0], PAPER_DLRT_VS_UV_STD[("one", "fixed")][0]
    print("| runs | seeds | epoch-1 test accuracy per seed | mean ± std |")
    print("|---|---|---|---|")
    for label, values in rows.items():
        values.sort()
        accs = [acc for _, acc in values]
        mean, std = mean_std(accs)
        print(f"| {label} | {len(values)} | {', '.join(f'{acc:.1f}' for acc in accs)} | {mean:.2f} ± {std:.2f} |")
    print(f"| the paper (the authors' 10 result files) | 10 | | {paper_mean:.2f} ± {paper_std:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "same-start"):
        command = commands.add_parser(name)
        command.add_argument("--repo", required=True, help="a git clone of COMPiLELab/DLRT-Net (checkout or bare)")
        command.add_argument("--decay", type=float, default=1.0, help="their decay d: σ_k = s_k d^-k")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--data-root", default="data")
    commands.choices["train"].add_argument("--epochs", type=int, default=1)
    commands.choices["same-start"].add_argument("--steps", type=int, default=469, help="469 = one epoch")
    commands.choices["same-start"].add_argument("--every", type=int, default=50, help="print every this many steps")
    command = commands.add_parser("summary")
    command.add_argument("--published", nargs="*", default=[], help="JSON lines of `train`")
    command.add_argument("--dlrt", nargs=2, action="append", default=[], metavar=("LABEL", "GLOB"),
                         help="the dlrt-run folders that GLOB matches, as LABEL (repeat it; a label twice pools)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"train": train, "same-start": same_start, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
