"""Training and evaluation loaders.

Training batches are a pure function of (seed, iteration): for each source domain d, iteration t
takes stream positions t*b ... t*b+b-1 of a per-epoch random permutation of that domain, and every
sample's augmentation is seeded by its stream position. A resumed run at iteration t therefore sees
exactly the batches an uninterrupted run would, with no sampler state to save, whatever the number
of loader workers. Under torchrun, rank r takes its share of every domain's b images.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .folder import SegFolder


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class SeededItems(Dataset):
    """Items keyed by (domain, index, augmentation seed) over several SegFolders (no own transform)."""

    def __init__(self, datasets: Sequence[SegFolder], transform: Callable[[dict], dict]) -> None:
        self.datasets, self.transform = list(datasets), transform

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        d, index, aug_seed = key
        item = self.datasets[d][index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            item = self.transform(item)
        item["domain"] = d
        return item


class IterationBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields, for t in [start, stop), the keys of batch t: `per_domain` images of each domain."""

    def __init__(self, sizes: Sequence[int], per_domain: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1) -> None:
        if per_domain % world:
            raise ValueError(f"batch_per_domain={per_domain} must be divisible by the number of processes ({world})")
        self.sizes, self.b, self.seed, self.start, self.stop = list(sizes), per_domain, seed, start, stop
        self.rank, self.world = rank, world
        self._perm: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _index(self, d: int, k: int) -> int:
        n = self.sizes[d]
        epoch = k // n
        if (d, epoch) not in self._perm:
            self._perm = {key: v for key, v in self._perm.items() if key[0] != d}  # keep one epoch per domain
            g = torch.Generator().manual_seed(stable_seed("epoch", self.seed, d, epoch))
            self._perm[(d, epoch)] = torch.randperm(n, generator=g)
        return int(self._perm[(d, epoch)][k % n])

    def batch(self, t: int) -> list[tuple[int, int, int]]:
        share = self.b // self.world
        keys = []
        for d in range(len(self.sizes)):
            for j in range(self.rank * share, (self.rank + 1) * share):
                k = t * self.b + j
                keys.append((d, self._index(d, k), stable_seed("aug", self.seed, d, k)))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for t in range(self.start, self.stop):
            yield self.batch(t)


def train_loader(datasets: Sequence[SegFolder], transform: Callable[[dict], dict], per_domain: int, seed: int,
                 start: int, stop: int, num_workers: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    sampler = IterationBatchSampler([len(d) for d in datasets], per_domain, seed, start, stop, rank, world)
    # Own generator: creating a DataLoader iterator otherwise draws from the global RNG, which would
    # shift dropout noise after a resume.
    return DataLoader(SeededItems(datasets, transform), batch_sampler=sampler, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def collate_by_size(items: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
    """One batch when every image has the same size, else a list of same-size batches (an evaluation set may
    mix sizes, e.g. Mapillary at native resolution); `dgnb.engine.evaluate` accepts both."""
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    batches = [default_collate(g) for g in groups.values()]
    return batches[0] if len(batches) == 1 else batches


def eval_loader(dataset: SegFolder, batch_size: int = 8, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_by_size)
