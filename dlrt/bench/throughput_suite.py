"""The throughput suite (run only when named): images per second of the sharded input pipeline and of DLRT
training on a generated image folder, for 1 and 2 data-parallel processes on the CPU (gloo), or 1 process on a GPU
(nccl) in fp32 and bf16. results/bench/throughput.* and docs/runner.md's figures come from it:

    dlrt-bench --suite throughput --out results/bench                     # CPU: 1 and 2 processes, fp32
    dlrt-bench --suite throughput --device cuda --tp-processes 1 --tp-precisions fp32,bf16 --tp-model resnet50 \\
        --tp-images 4096 --tp-image-size 256 --tp-batch 128 --tp-loader-workers 8 --out "$OUT"   # a GPU

The data are an ImageNet-layout folder of generated images (dlrt.experiments.data.images.write_image_folder) read
through data=imagenet's loaders: RandomResizedCrop(224) + flip, each process reading only its own shard
(dlrt.experiments.data.sharding), with --tp-loader-workers DataLoader processes per process. "input" times one epoch
of batches arriving on the device (decode, augment, collate, copy) after a warm-up epoch; "train" times one epoch of
training steps (forward, backward and the adaptive DLRT step, fed by the same loader) after a warm-up epoch.
Images/s counts the images of all processes over the slowest process's time. Each process takes --threads threads
(1 unless given). Needs torchvision, numpy and Pillow, not Hydra.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dlrt
from dlrt import DLRTOptimizer

from .output import Meta, table

CLASSES = 10


def small_resnet(num_classes: int) -> nn.Module:
    """Two basic blocks (8 and 16 channels) after a stride-4 stem: a BatchNorm net cheap enough for a CPU."""

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                      nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
            self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            return F.relu(self.body(x) + self.shortcut(x))

    net = nn.Sequential(nn.Conv2d(3, 8, 7, 4, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        Block(8, 8, 1), Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return dlrt.convert(net)[0]


def make_model(name: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "small_resnet":
        return small_resnet(num_classes)
    from dlrt.experiments.models import build_model

    return build_model(name, (3, 224, 224), num_classes, rank=0.1)  # resnet50, vgg16: the paper's nets


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epoch(batches, device, step=None) -> tuple[int, float]:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        if step is not None:
            step(batch)
        seen += batch.count
    synchronize(device)
    return seen, time.perf_counter() - start


def worker(rank: int, args, device_type: str, world_size: int, root: Path, store: Path, results: Path) -> None:
    """One data-parallel process: its shard's epochs, timed; rank 0 leaves the rows in results/p<world_size>.pt."""
    from dlrt.experiments.data import load_device_data  # the harness's loaders, in the spawned process only

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, **({"device_id": device} if device.type == "cuda" else {}))
    cfg = SimpleNamespace(data=SimpleNamespace(name="imagenet", root=str(root), subset=None, workers=args.tp_loader_workers),
                          seed=0, batch_size=args.tp_batch, eval_batch_size=args.tp_batch)
    data = load_device_data(cfg, device, SimpleNamespace(rank=rank, world_size=world_size))
    generator = torch.Generator().manual_seed(0)

    def total(seen: int, seconds: float) -> tuple[int, float]:
        t = torch.tensor([seen, seconds], dtype=torch.float64, device=device)
        both = [t.clone() for _ in range(world_size)]
        dist.all_gather(both, t)
        return int(sum(b[0] for b in both)), float(max(b[1] for b in both))

    rows = []
    timed_epoch(data.train_batches(generator), device)  # warm-up: starts the loader processes
    dist.barrier()
    seen, seconds = total(*timed_epoch(data.train_batches(generator), device))
    rows.append({"phase": "input", "precision": "-", "images": seen, "seconds": seconds})
    for precision in args.tp_precisions:
        model = make_model(args.tp_model, data.num_classes).to(device)
        optimizer = DLRTOptimizer(model, lr=0.01, tau=0.1, momentum=0.9)

        def step(batch):
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(batch.x), batch.y)
            weight = batch.loss_weight(world_size)
            (loss if weight == 1 else loss * weight).backward()
            optimizer.step()

        timed_epoch(data.train_batches(generator), device, step)  # warm-up: the ranks settle, kernels load
        dist.barrier()
        seen, seconds = total(*timed_epoch(data.train_batches(generator), device, step))
        rows.append({"phase": "train", "precision": precision, "images": seen, "seconds": seconds})
    if rank == 0:
        torch.save(rows, results / f"p{world_size}.pt")
    dist.barrier()  # no process leaves the group while another still uses it (gloo can abort the one left behind)
    dist.destroy_process_group()


def add_arguments(parser) -> None:
    group = parser.add_argument_group("throughput suite (--suite throughput)")
    numbers = lambda text: [int(v) for v in text.split(",") if v]
    group.add_argument("--tp-processes", type=numbers, default=[1, 2], help="data-parallel process counts, e.g. 1,2")
    group.add_argument("--tp-precisions", type=lambda text: [p for p in text.split(",") if p], default=["fp32"],
                       help="fp32 and/or bf16, e.g. fp32,bf16")
    group.add_argument("--tp-model", choices=["small_resnet", "resnet50", "vgg16"], default="small_resnet")
    group.add_argument("--tp-images", type=int, default=256, help="training images generated (10 %% are held out)")
    group.add_argument("--tp-image-size", type=int, default=64, help="side of the generated images")
    group.add_argument("--tp-format", choices=["png", "jpg"], default="png")
    group.add_argument("--tp-batch", type=int, default=32, help="the global batch size")
    group.add_argument("--tp-loader-workers", type=int, default=1, help="DataLoader processes per process")
    group.add_argument("--tp-note", default="", help="a line for the txt header (e.g. what else ran meanwhile)")


def check_arguments(args, error) -> None:
    if "throughput" not in args.suites:
        return
    if not args.tp_processes or min(args.tp_processes) < 1:
        error(f"--tp-processes: process counts must be integers >= 1, got {args.tp_processes}")
    wrong = sorted(set(args.tp_precisions) - {"fp32", "bf16"})
    if wrong or not args.tp_precisions:
        error(f"--tp-precisions: choose fp32 and/or bf16, got {','.join(args.tp_precisions)}")
    if args.tp_images < CLASSES or min(args.tp_image_size, args.tp_batch) < 1 or args.tp_loader_workers < 0:
        error(f"--tp-images must be >= {CLASSES} (one per class), --tp-image-size and --tp-batch >= 1, "
              "--tp-loader-workers >= 0")


def run(args, device: torch.device, meta: Meta) -> list[dict]:
    from dlrt.experiments.data.images import write_image_folder

    rows, load_before, started = [], os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_image_folder(tmp / "images", classes=CLASSES, train_per_class=args.tp_images // CLASSES,
                                  val_per_class=1, size=args.tp_image_size, suffix=f".{args.tp_format}")
        for processes in args.tp_processes:
            store = tmp / f"store{processes}"
            mp.spawn(worker, args=(args, device.type, processes, root, store, tmp), nprocs=processes, join=True)
            for row in torch.load(tmp / f"p{processes}.pt"):
                rows.append({"device": device.type, "backend": "nccl" if device.type == "cuda" else "gloo",
                             "processes": processes, "model": args.tp_model if row["phase"] == "train" else "-",
                             "loader_workers": args.tp_loader_workers, "threads_per_process": args.threads or 1,
                             "batch_size": args.tp_batch, **row,
                             "images_per_s": round(row["images"] / row["seconds"], 1)})
    seconds, load_after = time.perf_counter() - started, os.getloadavg()[0]
    return [{**row, "seconds_in_all": seconds, "load_before": load_before[0], "load_after": load_after, **meta.fields}
            for row in rows]


def report(rows: list[dict], args, meta: Meta, say) -> None:
    first = rows[0]
    say(f"{args.tp_images} generated {args.tp_image_size}x{args.tp_image_size} {args.tp_format.upper()} images in "
        f"{CLASSES} classes (ImageNet layout, 10 % held out), RandomResizedCrop(224) + flip; global batch "
        f"{args.tp_batch}; {args.tp_loader_workers} DataLoader process(es) and {first['threads_per_process']} "
        f"thread(s) per process; {first['seconds_in_all']:.0f} s in all")
    contended = meta.fields["device"] == "cpu" and max(first["load_before"], first["load_after"]) > 1
    say(f"load average (1 min) {first['load_before']:.2f} before, {first['load_after']:.2f} after, on "
        f"{os.cpu_count()} cores" + (": CONTENDED, other processes shared the CPU" if contended else ""))
    if args.tp_note:
        say(args.tp_note)
    say(table(rows, ["processes", "phase", "precision", "model", "images", "seconds", "images_per_s"]))
