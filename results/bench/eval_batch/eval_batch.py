"""Seconds to evaluate 10 240 MNIST-shaped images, by evaluation batch size: LeNet5 and FC width 784, dense and
low-rank (the library's starting ranks), one thread, the best of 3 rounds (each round goes over every batch size).
Why `eval_batch_size` defaults to 256 (it was 2048):

    python results/bench/eval_batch/eval_batch.py > results/bench/eval_batch/eval_batch.txt
"""

import platform
import subprocess
import time
from datetime import datetime, timezone

import torch

from dlrt.experiments.models import build_model

BATCH_SIZES = (2048, 512, 256, 128)
IMAGES = 10240


def seconds_by_batch_size(model, images) -> dict[int, float]:
    best = {size: float("inf") for size in BATCH_SIZES}
    with torch.no_grad():
        for _ in range(3):
            for size in BATCH_SIZES:
                start = time.perf_counter()
                for i in range(0, len(images), size):
                    model(images[i:i + size])
                best[size] = min(best[size], time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.rand(IMAGES, 1, 28, 28)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, code {code}")
    print(f"seconds for {IMAGES} images (best of 3), then the ratio to batch 256")
    print("model    layers    " + "  ".join(f"{size:>6}" for size in BATCH_SIZES) + "   " +
          "  ".join(f"{size:>5}/256" for size in BATCH_SIZES))
    for label, name, options in (("lenet5", "lenet5", {}), ("fc784", "fc", {"width": 784})):
        for low_rank in (False, True):
            model = build_model(name, (1, 28, 28), 10, low_rank=low_rank, **options).eval()
            best = seconds_by_batch_size(model, images)
            print(f"{label:<8} {'low-rank' if low_rank else 'dense':<9} " +
                  "  ".join(f"{best[size]:6.3f}" for size in BATCH_SIZES) + "   " +
                  "  ".join(f"{best[size] / best[256]:9.2f}" for size in BATCH_SIZES))


if __name__ == "__main__":
    main()
