"""`dgnb data inspect`: what a dataset in the common layout holds; `load_split`: a split as one batch for the notebooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .folder import SegFolder, list_samples, load_label, read_meta
from .taxonomy import CLASSES, NUM_CLASSES


def class_frequencies(label_paths: list[Path]) -> np.ndarray:
    """Fraction of labelled pixels per train id over the given label files."""
    counts = np.zeros(256, dtype=np.int64)
    for p in label_paths:
        counts += np.bincount(load_label(p).ravel(), minlength=256)
    valid = counts[:NUM_CLASSES]
    return valid / max(valid.sum(), 1)


def describe_dataset(root: str | Path, name: str, max_labels: int = 200) -> str:
    """A short report: meta, split sizes, and the class pixel frequencies of the first split."""
    meta = read_meta(root, name)
    lines = [f"## {name}: {meta.get('description', '')} (role: {meta.get('role', '?')})"]
    splits = sorted(p.name for p in (Path(root) / name).iterdir() if (p / "images").is_dir())
    for split in splits:
        samples = list_samples(Path(root) / name / split)
        freq = class_frequencies([s.label for s in samples[:max_labels] if s.label is not None])
        top = ", ".join(f"{CLASSES[c]} {100 * freq[c]:.1f}%" for c in np.argsort(-freq) if freq[c] > 0)
        lines.append(f"- {split}: {len(samples)} images; pixel share: {top}")
    return "\n".join(lines)


def load_split(root: str | Path, dataset: str, split: str = "val", n: int | None = None,
               labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `n` images of one split as a batch, un-transformed (what the notebooks show and probe):
    images (n, 3, H, W) float in [0, 1] and labels (n, H, W) int64 train ids, or None with `labels=False`
    (a UDA target's train split read as training sees it)."""
    ds = SegFolder(root, dataset, split, limit=n, labels=labels)
    pairs = [ds.tensors(i) for i in range(len(ds))]
    images = torch.stack([img for img, _ in pairs]).float() / 255
    return images, (torch.stack([lbl for _, lbl in pairs]) if labels else None)
