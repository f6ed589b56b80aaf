"""Measurements the notebooks plot: style statistics, predictions, mIoU against a knob's severity."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .data.taxonomy import NUM_CLASSES
from .engine.evaluate import SegMetrics, confusion_matrix
from .models import Segmenter


@torch.no_grad()
def channel_statistics(model: Segmenter, images: torch.Tensor, stage: str = "stem") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image channel mean μ and std σ of the `stage` features, each (B, C): what IN removes."""
    model.eval()
    stages, _ = model.encode(images.to(next(model.parameters()).device))
    f = stages[stage].float()
    return f.mean(dim=(2, 3)).cpu(), f.std(dim=(2, 3)).cpu()


def style_statistics(model: Segmenter, images_by_domain: Mapping[str, torch.Tensor], stage: str = "stem"):
    """DataFrame, one row per image: domain, mean (of μ), std (of σ), pc1, pc2 (PCA of [μ, σ])."""
    import pandas as pd
    from sklearn.decomposition import PCA

    rows, vectors = [], []
    for domain, images in images_by_domain.items():
        mu, sigma = channel_statistics(model, images, stage)
        vectors.append(torch.cat([mu, sigma], 1).numpy())
        rows += [{"domain": domain, "mean": m.mean().item(), "std": s.mean().item()} for m, s in zip(mu, sigma)]
    pcs = PCA(n_components=2).fit_transform(np.concatenate(vectors))
    df = pd.DataFrame(rows)
    df["pc1"], df["pc2"] = pcs[:, 0], pcs[:, 1]
    return df


def image_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """List of (H,W,3) uint8 arrays -> (B,3,H,W) float in [0,1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def predict_labels(method, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Arg-max label maps (B,H,W) of a method (anything with `.predict(images) -> scores`)."""
    method.eval()
    device = next(method.parameters()).device
    out = [method.predict(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def miou_of(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return SegMetrics(confusion_matrix(pred, labels, NUM_CLASSES)).miou


def severity_sweep(method, domain: str, knob: str, severities: Sequence[int] = range(6), n: int = 24,
                   size: tuple[int, int] = (128, 256), split: str = "val", seed: int = 0) -> dict[int, float]:
    """mIoU of `method` on `n` renders of `domain` with `knob` set to each severity (same layouts)."""
    from .data.city import DOMAINS, render

    out = {}
    for s in severities:
        dom = DOMAINS[domain].with_knobs(**{knob: s})
        renders = [render(dom, split, i, seed=seed, size=size) for i in range(n)]
        images = image_tensor([r.image for r in renders])
        labels = torch.from_numpy(np.stack([r.label for r in renders]).astype(np.int64))
        out[int(s)] = round(miou_of(predict_labels(method, images), labels), 2)
    return out
