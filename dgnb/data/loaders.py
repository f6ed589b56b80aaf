"""Training and evaluation loaders.

Training batches are a pure function of (seed, iteration): for each source domain d, iteration t
takes stream positions t*b ... t*b+b-1 of a per-epoch random permutation of that domain, and every
sample's augmentation is seeded by its stream position. A resumed run at iteration t therefore sees
exactly the batches an uninterrupted run would, with no sampler state to save, whatever the number
of loader workers. Under torchrun, rank r takes its share of every domain's b images.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .folder import SegFolder
from .transforms import BatchAugment


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class SeededItems(Dataset):
    """Decoded, un-augmented items keyed by (domain, index, augmentation seed) over several SegFolders.

    Loader workers (if any) only decode; the augmentation runs batched afterwards (`AugmentedBatches`).
    """

    def __init__(self, datasets: Sequence[SegFolder]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        d, index, aug_seed = key
        image, label = self.datasets[d].tensors(index)
        return {"image": image, "label": label, "domain": d, "seed": aug_seed}


def collate_lists(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Images of different sizes cannot be stacked before the crop: keep lists, stack the domain ids."""
    return {"image": [it["image"] for it in items], "label": [it["label"] for it in items],
            "domain": torch.tensor([it["domain"] for it in items]), "seed": [it["seed"] for it in items]}


class AugmentedBatches:
    """Iterates a loader of decoded items and applies `BatchAugment` to each batch (on `device` if given:
    on a GPU the augmentation then costs next to nothing)."""

    def __init__(self, loader: DataLoader, augment: BatchAugment, device: torch.device | None = None) -> None:
        self.loader, self.augment, self.device = loader, augment, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for raw in self.loader:
            images, labels = raw["image"], raw["label"]
            if self.device is not None:
                images = [im.to(self.device, non_blocking=True) for im in images]
                labels = [lb.to(self.device, non_blocking=True) for lb in labels]
            image, label = self.augment(images, labels, raw["seed"])
            yield {"image": image, "label": label, "domain": raw["domain"]}


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


def train_loader(datasets: Sequence[SegFolder], augment: BatchAugment, per_domain: int, seed: int,
                 start: int, stop: int, num_workers: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | None = None) -> AugmentedBatches:
    """Batches of iterations start..stop-1: `per_domain` augmented images of each source domain."""
    sampler = IterationBatchSampler([len(d) for d in datasets], per_domain, seed, start, stop, rank, world)
    # Own generator: creating a DataLoader iterator otherwise draws from the global RNG, which would
    # shift dropout noise after a resume.
    loader = DataLoader(SeededItems(datasets), batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_lists, generator=torch.Generator().manual_seed(seed))
    return AugmentedBatches(loader, augment, device)


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
