"""Training and evaluation loaders.

Training batches are a pure function of (seed, iteration): for each source domain d, iteration t
takes stream positions t*b ... t*b+b-1 of a per-epoch random permutation of that domain, and every
sample's augmentation is seeded by its stream position. A resumed run at iteration t therefore sees
exactly the batches an uninterrupted run would, with no sampler state to save, whatever the number
of loader workers. Under torchrun, rank r takes its share of every domain's b images.

In the UDA setting a target stream is drawn the same way (its own permutations and augmentation seeds,
keyed apart from the sources'), from a dataset that holds no labels (`SegFolder(..., labels=False)`):
the target's training labels cannot be read. A stage that trains on pseudo labels reads them instead.
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
    on a GPU the augmentation then costs next to nothing). Items of dataset index >= `num_sources` are the
    target stream: they become `target_image` (and `target_label` when the target dataset has labels, i.e.
    pseudo labels)."""

    def __init__(self, loader: DataLoader, augment: BatchAugment, device: torch.device | None = None,
                 num_sources: int | None = None) -> None:
        self.loader, self.augment, self.device, self.num_sources = loader, augment, device, num_sources

    def __len__(self) -> int:
        return len(self.loader)

    def _augment(self, images: list, labels: list, seeds: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.device is not None:
            images = [im.to(self.device, non_blocking=True) for im in images]
            labels = [lb.to(self.device, non_blocking=True) if lb is not None else None for lb in labels]
        if any(lb is None for lb in labels):
            return self.augment(images, None, seeds)
        return self.augment(images, labels, seeds)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for raw in self.loader:
            domain = raw["domain"]
            src = [i for i, d in enumerate(domain.tolist()) if self.num_sources is None or d < self.num_sources]
            image, label = self._augment([raw["image"][i] for i in src], [raw["label"][i] for i in src],
                                         [raw["seed"][i] for i in src])
            batch = {"image": image, "label": label, "domain": domain[src]}
            if len(src) < len(domain):
                tgt = list(range(len(src), len(domain)))  # the sampler puts the target stream last
                t_image, t_label = self._augment([raw["image"][i] for i in tgt], [raw["label"][i] for i in tgt],
                                                 [raw["seed"][i] for i in tgt])
                batch["target_image"] = t_image
                if t_label is not None:
                    batch["target_label"] = t_label
            yield batch


class IterationBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields, for t in [start, stop), the keys of batch t: `per_domain` images of each domain."""

    def __init__(self, sizes: Sequence[int], per_domain: int, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, target: tuple[int, int] | None = None) -> None:
        if per_domain % world:
            raise ValueError(f"batch_per_domain={per_domain} must be divisible by the number of processes ({world})")
        if target is not None and target[1] % world:
            raise ValueError(f"data.target_batch={target[1]} must be divisible by the number of processes ({world})")
        self.sizes, self.b, self.seed, self.start, self.stop = list(sizes), per_domain, seed, start, stop
        self.rank, self.world = rank, world
        self.target = target  # (number of target images, target images per batch), or None (DG)
        self._perm: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _index(self, d: int, k: int) -> int:
        target = d == len(self.sizes)
        n = self.target[0] if target else self.sizes[d]
        epoch = k // n
        if (d, epoch) not in self._perm:
            self._perm = {key: v for key, v in self._perm.items() if key[0] != d}  # keep one epoch per domain
            key = ("target-epoch", self.seed, epoch) if target else ("epoch", self.seed, d, epoch)
            g = torch.Generator().manual_seed(stable_seed(*key))
            self._perm[(d, epoch)] = torch.randperm(n, generator=g)
        return int(self._perm[(d, epoch)][k % n])

    def batch(self, t: int) -> list[tuple[int, int, int]]:
        """Keys (dataset, index, augmentation seed) of batch t: the sources' images, domain-major, then the
        target stream's (dataset index len(sizes)), each stream a pure function of (seed, t)."""
        share = self.b // self.world
        keys = []
        for d in range(len(self.sizes)):
            for j in range(self.rank * share, (self.rank + 1) * share):
                k = t * self.b + j
                keys.append((d, self._index(d, k), stable_seed("aug", self.seed, d, k)))
        if self.target is not None:
            d, b = len(self.sizes), self.target[1]
            share = b // self.world
            for j in range(self.rank * share, (self.rank + 1) * share):
                k = t * b + j
                keys.append((d, self._index(d, k), stable_seed("target-aug", self.seed, k)))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for t in range(self.start, self.stop):
            yield self.batch(t)


def train_loader(datasets: Sequence[SegFolder], augment: BatchAugment, per_domain: int, seed: int,
                 start: int, stop: int, num_workers: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, target: SegFolder | None = None,
                 target_batch: int = 0) -> AugmentedBatches:
    """Batches of iterations start..stop-1: `per_domain` augmented images of each source domain, plus
    `target_batch` images of `target` (UDA) as `target_image` (and `target_label` if `target` has labels)."""
    if target is not None and target.split == "train" and target.has_labels and not target.pseudo:
        raise ValueError(f"the UDA target stream must not carry the target's own labels ({target.root / target.dataset}"
                         "/train): build it with SegFolder(..., labels=False)")
    sizes = [len(d) for d in datasets]
    stream = (len(target), target_batch) if target is not None else None
    sampler = IterationBatchSampler(sizes, per_domain, seed, start, stop, rank, world, target=stream)
    # Own generator: creating a DataLoader iterator otherwise draws from the global RNG, which would
    # shift dropout noise after a resume.
    items = SeededItems(list(datasets) + ([target] if target is not None else []))
    loader = DataLoader(items, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_lists, generator=torch.Generator().manual_seed(seed))
    return AugmentedBatches(loader, augment, device, num_sources=len(datasets))


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
