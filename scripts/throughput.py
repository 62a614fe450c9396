"""Images per second of the sharded input pipeline and of DLRT training on a generated image folder, for 1 and 2
data-parallel processes on the CPU (gloo), or 1 process on a GPU (nccl) in fp32 and bf16.

    python scripts/throughput.py                                   # CPU: 1 and 2 processes, fp32
    python scripts/throughput.py --device cuda --processes 1 --precisions fp32,bf16 --model resnet50 \\
        --images 4096 --image-size 256 --batch-size 128 --loader-workers 8 --out "$OUT"    # a GPU

It writes throughput.csv and throughput.txt into --out (results/bench by default). The data are an ImageNet-layout
folder of generated images (dlrt.experiments.data.images.write_image_folder) read through data=imagenet's
loaders: RandomResizedCrop(224) + flip, each process reading only its own shard (dlrt.experiments.data.sharding),
with --loader-workers DataLoader processes per process. "input" times one epoch of batches arriving on the device
(decode, augment, collate, copy) after a warm-up epoch; "train" times one epoch of training steps (forward,
backward and the adaptive DLRT step, fed by the same loader) after a warm-up epoch. Images/s counts the images of
all processes over the slowest process's time. Needs torch, torchvision, numpy and Pillow, not Hydra.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout, not installed

from dlrt import DLRTOptimizer  # noqa: E402
from dlrt.experiments.data import load_device_data  # noqa: E402
from dlrt.experiments.data.images import write_image_folder  # noqa: E402

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

    import dlrt

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


def worker(rank: int, args, root: Path, store: Path, results: Path) -> None:
    world_size = args.processes_now
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, **({"device_id": device} if device.type == "cuda" else {}))
    cfg = SimpleNamespace(data=SimpleNamespace(name="imagenet", root=str(root), subset=None, workers=args.loader_workers),
                          seed=0, batch_size=args.batch_size, eval_batch_size=args.batch_size)
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
    for precision in args.precisions.split(","):
        model = make_model(args.model, data.num_classes).to(device)
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
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--processes", default="1,2", help="data-parallel process counts, e.g. 1,2")
    parser.add_argument("--precisions", default="fp32", help="fp32 and/or bf16, e.g. fp32,bf16")
    parser.add_argument("--model", choices=["small_resnet", "resnet50", "vgg16"], default="small_resnet")
    parser.add_argument("--images", type=int, default=256, help="training images generated (10 %% are held out)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch size")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--note", default="", help="a line for the txt header (e.g. what else ran meanwhile)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    rows, load_before = [], os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_image_folder(tmp / "images", classes=CLASSES, train_per_class=args.images // CLASSES,
                                  val_per_class=1, size=args.image_size, suffix=f".{args.format}")
        for processes in map(int, args.processes.split(",")):
            args.processes_now = processes
            store = tmp / f"store{processes}"
            mp.spawn(worker, args=(args, root, store, tmp), nprocs=processes, join=True)
            for row in torch.load(tmp / f"p{processes}.pt"):
                rows.append({"device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
                             "processes": processes, "model": args.model if row["phase"] == "train" else "-",
                             "loader_workers": args.loader_workers, "threads": args.threads,
                             "batch_size": args.batch_size, **row,
                             "images_per_s": round(row["images"] / row["seconds"], 1)})
    load_after = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda" else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    header = [f"# python scripts/throughput.py {shlex.join(sys.argv[1:])}",
              f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}, {machine}, torch {torch.__version__}",
              f"# {args.images} generated {args.image_size}x{args.image_size} {args.format.upper()} images in "
              f"{CLASSES} classes (ImageNet layout, 10 % held out), RandomResizedCrop(224) + flip; global batch "
              f"{args.batch_size}; {args.loader_workers} DataLoader process(es) and {args.threads} thread(s) per "
              f"process; {time.perf_counter() - started:.0f} s in all",
              f"# load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
              f"{os.cpu_count()} cores" + (": CONTENDED, other processes shared the CPU" if args.device == "cpu"
                                            and max(load_before[0], load_after[0]) > 1 else "")]
    if args.note:
        header.append(f"# {args.note}")
    columns = ["processes", "phase", "precision", "model", "images", "seconds", "images_per_s"]
    table = [" | ".join(columns), " | ".join("---" for _ in columns)]
    table += [" | ".join(str(row[c]) if c != "seconds" else f"{row[c]:.2f}" for c in columns) for row in rows]
    (args.out / "throughput.txt").write_text("\n".join(header + [""] + table) + "\n")
    print("\n".join(header + [""] + table))


if __name__ == "__main__":
    main()
