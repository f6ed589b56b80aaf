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


# ----- paired comparisons over seeds ------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    import math

    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom (no SciPy: the CDF
    through the incomplete beta function, inverted by bisection to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0

    def cdf(t: float) -> float:
        tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
        return 1.0 - tail if t > 0 else tail

    lo, hi = -1.0, 1.0
    while cdf(lo) > p:
        lo *= 2.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of the paired differences a[i] − b[i] (e.g. two methods on the same seeds) with a Student-t
    confidence interval: {"mean", "half_width", "low", "high", "sd", "n", "confidence", "excludes_zero"}.

    half_width = t_{(1+confidence)/2, n−1} · s / √n, s the sample standard deviation of the
    differences. With a single pair the interval is infinite (half_width inf, low −inf, high +inf) and
    excludes_zero is False.
    """
    import math

    if len(a) != len(b):
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError("paired_difference needs at least one pair")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"mean": mean, "half_width": math.inf, "low": -math.inf, "high": math.inf, "sd": math.nan, "n": n,
                "confidence": confidence, "excludes_zero": False}
    sd = float(d.std(ddof=1))
    half = _t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return {"mean": mean, "half_width": half, "low": low, "high": high, "sd": sd, "n": n, "confidence": confidence,
            "excludes_zero": bool(low > 0 or high < 0)}

