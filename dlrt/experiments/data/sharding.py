"""Which examples each worker reads, one rule for every data set (in-memory tensors and image folders alike).

**Training.** An epoch is a permutation of the n training examples, drawn on the CPU from the run's batch
generator (``torch.Generator().manual_seed(seed)``, one draw per epoch, saved in the checkpoint), so that every
worker draws the same one: the permutation of epoch e is a function of (seed, e, n) only. Global batch b is
``perm[b*B:(b+1)*B]`` for the configured ``batch_size`` B; worker k of W takes every W-th element of it from the
k-th on, ``perm[b*B + k : (b+1)*B : W]``. So W workers together train on exactly the global batches of one
process, each reading only its own examples, and one process (W = 1) trains on the batches it always did.

**The last global batch** holds n mod B examples when B does not divide n. It is trained on, split the same way,
so its shards differ by at most one example. Every worker weights its mean loss by
``count * W / global_count`` (1 whenever B is a multiple of W), so the workers' averaged gradients are the
gradient of the global batch's mean loss, as for one process. A worker whose shard is empty (a last batch of
fewer than W examples) steps on a stand-in example of zeros with weight 0, so that every worker takes part in
every step's collectives and all workers take the same number of steps.

**Evaluation.** Worker k evaluates the k-th of W contiguous blocks of the val and test sets; the loss sums,
correct counts and counts are then summed over the workers (train.evaluate), so every worker ends the epoch
with the numbers of one process.

**Augmentation** of image folders is seeded per example: the epoch draws one more number after its permutation,
and example i's transform runs with torch's CPU generator seeded from it and i (images.SeededSamples). So the
crops and flips of an example do not depend on which worker, which DataLoader worker process or which
process count reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch


@dataclass(frozen=True)
class Shard:
    """This process's part of the data: worker `rank` of `world_size` (0 of 1 for one process)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of the {self.world_size} workers")

    @classmethod
    def of(cls, workers) -> "Shard":
        """The shard of a runtime.Workers (anything with rank and world_size), or of one process for None."""
        return cls() if workers is None else cls(workers.rank, workers.world_size)

    def block(self, n: int) -> range:
        """This worker's contiguous block of n evaluation examples (the blocks differ by at most one)."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)


class Batch(NamedTuple):
    """One training step's batch of this worker."""

    x: torch.Tensor
    y: torch.Tensor
    count: int  # this worker's examples that count: len(y), or 0 for a stand-in
    global_count: int  # the examples of the global batch, over all workers

    def loss_weight(self, world_size: int) -> float:
        """The factor of this worker's mean loss that makes the workers' average the global batch's mean."""
        return self.count * world_size / self.global_count


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's global batches and this worker's part of each (CPU index tensors)."""

    order: torch.Tensor  # the permutation of range(n)
    batch_size: int
    shard: Shard
    augment_seed: int | None = None  # images only: the base of the per-example seeds

    @classmethod
    def draw(cls, n: int, batch_size: int, generator: torch.Generator, shard: Shard = Shard(),
             augment: bool = False) -> "EpochPlan":
        """The permutation (and, for augmented data, a seed) drawn from `generator`, the same on every worker."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = torch.randperm(n, generator=generator)
        seed = int(torch.randint(2**32, (), generator=generator)) if augment else None
        return cls(order, batch_size, shard, seed)

    def __len__(self) -> int:
        """The number of global batches (steps), the same on every worker."""
        return -(-len(self.order) // self.batch_size)

    def bounds(self, b: int) -> tuple[int, int]:
        return b * self.batch_size, min((b + 1) * self.batch_size, len(self.order))

    def global_count(self, b: int) -> int:
        start, stop = self.bounds(b)
        return stop - start

    def mine(self, b: int, order: torch.Tensor | None = None) -> torch.Tensor:
        """This worker's indices of global batch b (of `order`, a copy of self.order on another device)."""
        start, stop = self.bounds(b)
        return (self.order if order is None else order)[start + self.shard.rank : stop : self.shard.world_size]

    def sample_seed(self, index: int) -> int:
        """The seed of example `index`'s augmentation in this epoch."""
        return self.augment_seed + index


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                   shard: Shard = Shard()) -> Iterator[Batch]:
    """One epoch of this worker's batches of a data set that lives on the training device as two tensors: index
    slices, the permutation drawn on the CPU and moved to the device once."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    plan = EpochPlan.draw(len(x), batch_size, generator, shard)
    order = plan.order.to(x.device)
    for b in range(len(plan)):
        mine = plan.mine(b, order)
        if len(mine):
            yield Batch(x[mine], y[mine], len(mine), plan.global_count(b))
        else:
            yield stand_in(x, y)


def stand_in(x: torch.Tensor, y: torch.Tensor) -> Batch:
    """A batch of one example of zeros with weight 0: what a worker steps on when its shard is empty."""
    return Batch(torch.zeros_like(x[:1]), torch.zeros_like(y[:1]), 0, 1)


def tensor_chunks(x: torch.Tensor, y: torch.Tensor, size: int, shard: Shard = Shard()):
    """This worker's evaluation block in chunks of `size` (views, no copies)."""
    block = shard.block(len(x))
    for start in range(block.start, block.stop, size):
        stop = min(start + size, block.stop)
        yield x[start:stop], y[start:stop]
