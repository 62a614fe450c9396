"""Which device a run or a benchmark takes, and its name as records show it; torch alone, so that dlrt-bench,
which needs neither Hydra nor OmegaConf, reads them too."""

from __future__ import annotations

import os
import platform

import torch


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if there is one; under torchrun each worker takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the threads torch uses (run summaries and dlrt-bench's rows)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({os.cpu_count()} logical CPUs), {threads} thread{'s' if threads != 1 else ''}"
