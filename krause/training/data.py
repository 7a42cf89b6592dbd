"""Data-order helpers for exact resume.

Two things make a resumed run see the same data as an uninterrupted one:

1. The sample order of epoch e depends only on (seed, e): `DistributedSampler`
   does this when `set_epoch(epoch)` is called every epoch (the first release
   called `set_epoch(rank)`, giving every epoch the same order).
   `ResumableDistributedSampler.set_epoch(epoch, skip=n)` additionally starts an
   epoch after the n samples (per rank) that were already consumed, without
   loading them.
2. `iter(DataLoader)` draws its workers' base seed from the *global* torch RNG
   unless the loader has its own generator, so starting an epoch at a different
   point (as a mid-epoch resume does) would shift every later dropout mask. Give
   the loader a private generator and reseed it per epoch with
   `reseed(generator, seed, epoch, rank)`.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["derive_seed", "reseed", "ResumableDistributedSampler", "eval_shard", "ShardSampler"]


def eval_shard(num_examples: int, rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """Indices rank, rank + W, ... of an evaluation set: every example on exactly one rank.

    No padding (DistributedSampler pads by repeating examples, which double-counts them),
    so per-rank sums add up to the whole set and match a single process."""
    from .distributed import get_rank, get_world_size

    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return torch.arange(rank, num_examples, world_size)


class ShardSampler(torch.utils.data.Sampler):
    """`eval_shard` as a DataLoader sampler (evaluation: sum the metrics over ranks)."""

    def __init__(self, num_examples: int, rank: int | None = None, world_size: int | None = None):
        self.indices = eval_shard(num_examples, rank, world_size).tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (e.g. base seed, epoch, rank), stable across runs."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def reseed(generator: torch.Generator, *parts: int) -> torch.Generator:
    """Reseed `generator` from `derive_seed(*parts)` and return it."""
    generator.manual_seed(derive_seed(*parts))
    return generator


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (works for one process too) that can start an epoch part-way through.

    Without a process group, num_replicas=1 and rank=0 are used unless given.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        from .distributed import get_rank, get_world_size

        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Use epoch `epoch`'s order, leaving out its first `skip` samples (of this rank)."""
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip
