"""Data parallel DLRT: two gloo workers on halves of a batch equal one process on the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dlrt import DLRTOptimizer, low_rank_layers

from helpers import QUICK, batch_for, dlrt_run, python, seeded, small_cnn

STEPS = 3


def run_steps(model, opt, rank=0, world_size=1):
    for step in range(STEPS):
        x, y = batch_for(model, n=16, seed=step)
        x, y = x[rank::world_size], y[rank::world_size]  # this worker's shard of the global batch
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def worker(rank, world_size, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=1.0, tau=0.05, momentum=0.9)
    run_steps(model, opt, rank, world_size)
    torch.save({"ranks": opt.ranks(), "weights": [layer.dense_weight().detach() for layer in low_rank_layers(model)],
                "state": model.state_dict()}, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_workers_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(worker, args=(2, tmp_path / "store", tmp_path), nprocs=2, join=True)
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = seeded(small_cnn)
    opt = DLRTOptimizer(model, lr=1.0, tau=0.05, momentum=0.9)
    run_steps(model, opt)

    assert workers[0]["ranks"] == workers[1]["ranks"] == opt.ranks()
    for a, b in zip(workers[0]["state"].values(), workers[1]["state"].values()):
        assert torch.equal(a, b)  # the workers hold bit-identical models
    for W_worker, layer in zip(workers[0]["weights"], low_rank_layers(model)):
        W = layer.dense_weight().detach()
        assert torch.linalg.norm(W_worker - W) <= 1e-10 * torch.linalg.norm(W)


def test_torchrun_trains_one_run_folder_like_a_single_process(tmp_path):
    import pandas as pd

    args = [*QUICK, "data.n_train=512", "epochs=2", "model=fc", "model.width=64", "batch_size=64", "finetune.epochs=0",
            "optim=sgd", "lr=0.1"]
    runs = [python("-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "dlrt.experiments", *args,
                   f"out_dir={tmp_path / 'ddp'}", cwd=tmp_path, timeout=300),
            dlrt_run(*args, f"out_dir={tmp_path / 'single'}", cwd=tmp_path, timeout=300)]
    for result in runs:
        assert result.returncode == 0, result.stderr
    (ddp,), (single,) = (list(tmp_path.glob(f"{name}/*/epochs.csv")) for name in ("ddp", "single"))
    ddp, single = pd.read_csv(ddp), pd.read_csv(single)
    assert list(ddp["ranks"]) == list(single["ranks"])
    pd.testing.assert_series_equal(ddp["val_loss"], single["val_loss"], rtol=1e-5)
    pd.testing.assert_series_equal(ddp["train_loss"], single["train_loss"], rtol=1e-5)
