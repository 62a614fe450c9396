"""Data parallelism for DLRT without DistributedDataParallel, which cannot follow a rank change (it replaces
parameters): average every gradient over the workers, as DDP would, and take rank 0's buffers (BatchNorm
statistics). Every worker then computes the same step and takes the same truncation decisions from the same
numbers."""

from __future__ import annotations

import torch


def world_size() -> int:
    """The number of workers of the initialised process group, 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the workers in place, with one collective for all of them."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(value.reshape(t.shape))


def broadcast_buffers(buffers: list[torch.Tensor]) -> None:
    """Every worker takes rank 0's values of these buffers, in one collective."""
    buffers = [b for b in buffers if b.is_floating_point() or b.dtype == torch.long]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    torch.distributed.broadcast(flat, src=0)
    for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(value.reshape(b.shape))
