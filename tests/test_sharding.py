"""Sharded input (dlrt.experiments.data.sharding): each worker reads only its own part of every epoch, and W workers
train as one process does on the same global batches: LeNet5 on MNIST through torchrun, and a BatchNorm ResNet on
an image folder this file writes itself.

The equivalence figures (max relative differences, ranks) and the file reads per worker are printed; run with
`pytest -s tests/test_sharding.py` to see them."""

from __future__ import annotations

import json
import os
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import DLRTOptimizer, low_rank_layers
from dlrt.experiments.data import Batch, DataNotFoundError, EpochPlan, Shard, load_data, load_device_data
from dlrt.experiments.data.images import SeededSamples, load_image_splits, write_image_folder
from dlrt.experiments.data.sharding import tensor_batches, tensor_chunks
from dlrt.experiments.runtime import Workers
from dlrt.experiments.train import evaluate, train_epoch

from helpers import compose_config, python

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("DLRT_DATA_ROOT", REPO / "data"))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the Frobenius norm (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b)) if torch.linalg.norm(b) > 0 else float(torch.linalg.norm(a))


# --- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch_size,world_size", [(64, 16, 2), (70, 16, 2), (65, 16, 4), (17, 8, 3), (5, 8, 8)])
def test_the_workers_shards_partition_every_global_batch(n, batch_size, world_size):
    plans = [EpochPlan.draw(n, batch_size, torch.Generator().manual_seed(3), Shard(k, world_size))
             for k in range(world_size)]
    assert len({len(plan) for plan in plans}) == 1 and len(plans[0]) == -(-n // batch_size)  # the same steps
    for b in range(len(plans[0])):
        start, stop = plans[0].bounds(b)
        shards = [plan.mine(b) for plan in plans]
        assert sorted(torch.cat(shards).tolist()) == sorted(plans[0].order[start:stop].tolist())  # all, once
        sizes = [len(s) for s in shards]
        assert sizes == [len(range(k, stop - start, world_size)) for k in range(world_size)]  # by turns
        weights = [Batch(None, None, size, stop - start).loss_weight(world_size) for size in sizes]
        assert sum(weights) / world_size == pytest.approx(1.0)  # the average is the global batch's mean


def test_one_process_draws_the_batches_it_always_drew():
    """Shard() over tensors: consecutive slices of one CPU permutation per epoch, x and y paired, the last batch
    short, and the generator left where one randperm leaves it."""
    x, y = torch.randn(70, 3), torch.randint(0, 4, (70,))
    g_old, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for epoch in range(2):
        order = torch.randperm(70, generator=g_old)
        old = [(x[order[start:start + 16]], y[order[start:start + 16]]) for start in range(0, 70, 16)]
        new = list(tensor_batches(x, y, 16, g_new))
        assert len(old) == len(new) == 5
        for (xo, yo), batch in zip(old, new):
            assert torch.equal(xo, batch.x) and torch.equal(yo, batch.y) and batch.count == batch.global_count
    assert torch.equal(g_old.get_state(), g_new.get_state())


def test_a_worker_with_nothing_left_steps_on_a_weightless_stand_in():
    x, y = torch.randn(33, 3), torch.randint(0, 4, (33,))  # the last global batch holds 1 example, for 2 workers
    last = [list(tensor_batches(x, y, 16, torch.Generator().manual_seed(0), Shard(k, 2)))[-1] for k in range(2)]
    assert (last[0].count, last[0].global_count, last[0].loss_weight(2)) == (1, 1, 2.0)
    assert last[1].count == 0 and last[1].loss_weight(2) == 0 and not last[1].x.any()


def test_evaluation_blocks_partition_the_set():
    x, y = torch.arange(11.0).unsqueeze(1), torch.arange(11)
    blocks = [torch.cat([yb for _, yb in tensor_chunks(x, y, 2, Shard(k, 3))]) for k in range(3)]
    assert torch.equal(torch.cat(blocks), y) and [len(b) for b in blocks] == [3, 4, 4]


def test_an_examples_augmentation_depends_on_its_seed_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3) + i

    data = SeededSamples(Noisy())
    torch.manual_seed(0)
    first = data[(2, 77)]
    state = torch.get_rng_state()
    torch.rand(5)  # another global RNG state: the same example
    assert torch.equal(data[(2, 77)], first) and not torch.equal(data[(2, 78)], first)
    torch.set_rng_state(state)
    data[(1, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


# --- image folders: each worker reads its own files ----------------------------------------------

IMAGE_ARGS = ["data=imagenet", "batch_size=8", "eval_batch_size=4", "seed=0"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """2 classes x 19 training and 5 test images: 38 -> 35 train + 3 held out; global batches 8,8,8,8,3."""
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=2, train_per_class=19, val_per_class=5)


def test_each_worker_reads_only_its_own_files(image_root, tmp_path, monkeypatch):
    """Two workers, each with 2 DataLoader processes per loader: the files each opens in one epoch are exactly its shards of
    the global batches and its blocks of val and test; together they read every file once."""
    from torchvision.datasets import folder

    real_loader = folder.pil_loader
    splits = load_image_splits("imagenet", image_root, 0)
    path_of = lambda subset, i: subset.dataset.samples[subset.indices[i]][0]
    train_files = [path_of(splits.train, i) for i in range(len(splits.train))]
    val_files = [path_of(splits.val, i) for i in range(len(splits.val))]
    test_files = [path for path, _ in splits.test.samples]
    reads, expected = {}, {}
    for rank in range(2):
        log = tmp_path / f"reads{rank}.txt"

        def counting(path, log=log):  # runs in the DataLoader processes (forked from this one)
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
            return real_loader(path)

        monkeypatch.setattr(folder, "pil_loader", counting)
        cfg = compose_config([*IMAGE_ARGS, f"data.root={image_root}", "data.workers=2"])
        data = load_device_data(cfg, torch.device("cpu"), Workers(rank, 2))
        batches = list(data.train_batches(torch.Generator().manual_seed(0)))
        for part in ("val", "test"):
            list(data.eval_batches[part]())
        lines = [line.split(" ", 1) for line in log.read_text().splitlines()]
        reads[rank] = Counter(path for _, path in lines)
        processes = Counter(pid for pid, _ in lines)
        assert str(os.getpid()) not in processes  # decoded by its loader processes (2 per loader), not by itself
        plan = EpochPlan.draw(len(train_files), 8, torch.Generator().manual_seed(0), Shard(rank, 2), augment=True)
        mine = [i for b in range(len(plan)) for i in plan.mine(b).tolist()]
        expected[rank] = Counter([train_files[i] for i in mine] + [val_files[i] for i in Shard(rank, 2).block(3)]
                                 + [test_files[i] for i in Shard(rank, 2).block(len(test_files))])
        assert reads[rank] == expected[rank]  # its own files, each once
        assert sum(batch.count for batch in batches) == len(mine)
        print(f"\nworker {rank}: {sum(reads[rank].values())} file reads (train {len(mine)}, val "
              f"{len(Shard(rank, 2).block(3))}, test {len(Shard(rank, 2).block(len(test_files)))}), by its loader "
              f"processes {sorted(processes.values())}")
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(train_files + val_files + test_files)  # together: every file once


# --- equivalence: a BatchNorm ResNet on the image folder ----------------------------------------


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def small_resnet(num_classes: int) -> nn.Module:
    """A ResNet of two basic blocks (8 and 16 channels) for 224x224 inputs, its 3x3 convs low-rank."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, 4, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        Block(8, 8, 1), Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return dlrt.convert(net)[0]


NO_STOP = types.SimpleNamespace(received=None)
EPOCHS = 2


def ghost_epoch(model, optimizer, batches, world_size: int):
    """One process on the global batches, its BatchNorm taking statistics per worker shard (x[k::W]) and keeping
    the running statistics of shard 0, as W workers do: the reference the workers must equal."""
    loss_sum, correct, seen = 0.0, 0, 0
    for batch in batches:
        optimizer.zero_grad()
        for k in range(world_size):
            xk, yk = batch.x[k::world_size], batch.y[k::world_size]
            if not len(yk):
                continue
            logits = model(xk)
            loss = F.cross_entropy(logits, yk)
            (loss * (len(yk) / len(batch.y))).backward()  # gradients accumulate, as do the layers' records
            loss_sum, correct, seen = loss_sum + loss.item() * len(yk), correct + int((logits.argmax(1) == yk).sum()), seen + len(yk)
            if k == 0:
                kept = [b.clone() for b in model.buffers()]
        for b, value in zip(model.buffers(), kept):
            b.copy_(value)
        optimizer.step()
    return loss_sum, correct, seen


def train_resnet(root, workers: Workers, ghost: int = 0) -> dict:
    cfg = compose_config([*IMAGE_ARGS, f"data.root={root}", "data.workers=0"])
    data = load_device_data(cfg, torch.device("cpu"), workers)
    model = small_resnet(data.num_classes)
    optimizer = DLRTOptimizer(model, lr=0.05, tau=0.3, momentum=0.9)
    generator, rows = torch.Generator().manual_seed(cfg.seed), []
    for epoch in range(EPOCHS):
        if ghost:
            loss_sum, correct, seen = ghost_epoch(model, optimizer, data.train_batches(generator), ghost)
        else:
            loss_sum, correct, seen = train_epoch(model, optimizer, data.train_batches(generator), workers, NO_STOP)
        val, test = (evaluate(model, data.eval_batches[part](), workers=workers) for part in ("val", "test"))
        rows.append({"train_loss": loss_sum / seen, "val_loss": val.loss, "test_loss": test.loss,
                     "ranks": optimizer.ranks()})
    return {"rows": rows, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "weights": [layer.dense_weight().detach() for layer in low_rank_layers(model)]
                       + [p.detach() for name, p in model.named_parameters() if not name.endswith((".U", ".S", ".V"))]}


def resnet_worker(rank, world_size, store, root, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.save(train_resnet(root, Workers(rank, world_size)), f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def compare(ours: dict, reference: dict) -> dict:
    losses = max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(ours["rows"], reference["rows"])
                 for key in ("train_loss", "val_loss", "test_loss"))
    weights = max(max_rel(a, b) for a, b in zip(ours["weights"], reference["weights"]))
    ranks = lambda result: " / ".join(" ".join(map(str, row["ranks"])) for row in result["rows"])
    return {"losses": f"{losses:.2e}", "weights": f"{weights:.2e}", "ranks": ranks(ours),
            "reference_ranks": ranks(reference)}


def test_two_workers_train_a_batchnorm_resnet_on_an_image_folder_as_one_process(image_root, tmp_path):
    mp.spawn(resnet_worker, args=(2, tmp_path / "store", image_root, tmp_path), nprocs=2, join=True)
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(workers[0]["state"].values(), workers[1]["state"].values()):
        assert torch.equal(a, b)  # the two workers hold bit-identical models, BatchNorm buffers included
    ghost = train_resnet(image_root, Workers(), ghost=2)
    whole = train_resnet(image_root, Workers())  # one process whose BatchNorm sees the whole global batch
    figures = {"vs one process, BatchNorm per shard": compare(workers[0], ghost),
               "vs one process, BatchNorm over the global batch": compare(workers[0], whole)}
    print("\nsmall ResNet (BatchNorm) on the image folder, 2 workers, max relative differences:")
    for name, figure in figures.items():
        print(f"  {name}: {json.dumps(figure)}")
    same = figures["vs one process, BatchNorm per shard"]
    assert same["ranks"] == same["reference_ranks"]
    assert float(same["losses"]) < 1e-5 and float(same["weights"]) < 1e-4


# --- equivalence: LeNet5 on MNIST, through torchrun ----------------------------------------------


@pytest.fixture(scope="module")
def mnist_root():
    try:
        load_data("mnist", DATA_ROOT, subset=1)  # fetched once into the cache, as tests/test_data.py does
    except DataNotFoundError as e:
        pytest.skip(f"MNIST is not available here: {e}")
    return DATA_ROOT


def dense_weights(state: dict) -> dict:
    """Every weight of a LeNet5 checkpoint as a dense tensor (U S V^T for the low-rank layers)."""
    weights = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if name == "U":
            weights[prefix] = state[f"{prefix}.U"] @ state[f"{prefix}.S"] @ state[f"{prefix}.V"].T
        elif name not in ("S", "V"):
            weights[key] = value
    return weights


def test_two_workers_train_lenet5_on_mnist_as_one_process(mnist_root, tmp_path):
    """601 training images at batch 128: four global batches of 64 + 64 and one of 45 + 44."""
    args = ["model=lenet5", f"data.root={mnist_root}", "data.subset=601", "epochs=2", "tau=0.15", "progress=false",
            "threads=1"]
    for name, launcher in [("ddp", ["-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "dlrt.experiments"]),
                           ("single", ["-m", "dlrt.experiments"])]:
        result = python(*launcher, *args, f"out_dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    import pandas as pd

    (ddp,), (single,) = (list((tmp_path / name).glob("*/")) for name in ("ddp", "single"))
    rows = {name: pd.read_csv(folder / "epochs.csv") for name, folder in (("ddp", ddp), ("single", single))}
    assert list(rows["ddp"]["ranks"]) == list(rows["single"]["ranks"])
    losses = max(float(((rows["ddp"][k] - rows["single"][k]).abs() / rows["single"][k].abs()).max())
                 for k in ("train_loss", "val_loss", "test_loss"))
    ours, theirs = (dense_weights(torch.load(folder / "checkpoint.pt")["model"])
                    for folder in (ddp, single))
    weights = max(max_rel(ours[key], theirs[key]) for key in theirs)
    print(f"\nLeNet5 on MNIST, 2 workers vs 1 process: max relative difference of losses {losses:.2e}, of weights "
          f"{weights:.2e}; ranks {list(rows['ddp']['ranks'])} (both)")
    # The float noise of this run itself: one process with threads=2 instead of 1 (another summation order in
    # BLAS) ended 2.6e-4 apart in the weights, 1.3e-6 in the losses; the adaptive steps amplify rounding.
    assert losses < 1e-5 and weights < 1e-3
