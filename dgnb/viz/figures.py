"""Figures for the course. Every function returns a matplotlib Figure (testable headless)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3,H,W) float in [0,1] or uint8 tensor, or (H,W,3) array -> (H,W,3) uint8."""
    if torch.is_tensor(image):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        image = image.permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the Cityscapes colours of `label` over `image`; ignore pixels keep the image."""
    image = to_numpy_image(image)
    label = np.asarray(label)
    out = image.astype(np.float32)
    keep = label != IGNORE_INDEX
    out[keep] = (1 - alpha) * out[keep] + alpha * colorize(label)[keep]
    return out.round().astype(np.uint8)


def class_legend(fig: Figure, classes: Sequence[int] | None = None, ncol: int = 10) -> None:
    classes = range(NUM_CLASSES) if classes is None else classes
    handles = [Patch(color=PALETTE[c] / 255, label=CLASSES[c]) for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=min(ncol, len(handles)), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def image_grid(rows: Mapping[str, Sequence[np.ndarray]], col_titles: Sequence[str] | None = None,
               cell: float = 2.4, legend_classes: Sequence[int] | None = None, title: str | None = None) -> Figure:
    """Rows named by their key, each a list of (H,W,3) images."""
    names = list(rows)
    ncols = max(len(v) for v in rows.values())
    h, w = np.asarray(rows[names[0]][0]).shape[:2]
    fig, axes = plt.subplots(len(names), ncols, figsize=(cell * ncols * w / h / 1.6, cell * len(names) / 1.6 + 0.6),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(rows[name]):
                ax.imshow(rows[name][c])
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and col_titles is not None and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if legend_classes is not None:
        fig.subplots_adjust(bottom=min(0.12, 0.75 / fig.get_figheight()))
        class_legend(fig, legend_classes)
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def per_class_heatmap(per_class: Mapping[str, Mapping[str, float]], title: str = "per-class IoU (%)",
                      difference: bool = False) -> Figure:
    """Domains x classes heat-map of IoU; a blank cell is a class absent from that domain.

    `difference=True` reads the values as IoU differences in points (method A − method B): the
    colour scale is centred on 0 and spans ±20 (green: A better)."""
    import seaborn as sns

    classes = [c for c in CLASSES if any(c in v for v in per_class.values())]
    data = np.array([[per_class[d].get(c, np.nan) for c in classes] for d in per_class])
    fig, ax = plt.subplots(figsize=(0.55 * len(classes) + 2, 0.45 * len(per_class) + 1.6))
    scale = {"center": 0, "vmin": -20, "vmax": 20} if difference else {"vmin": 0, "vmax": 100}
    sns.heatmap(data, ax=ax, annot=True, fmt=".0f", cmap="RdYlGn", cbar=False, xticklabels=classes,
                yticklabels=list(per_class), annot_kws={"fontsize": 7}, **scale)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def domain_bars(results: Mapping[str, Mapping[str, float]], roles: Mapping[str, str] | None = None,
                title: str = "mIoU per domain") -> Figure:
    """Grouped bars: results[method][domain] = mIoU; domains coloured/labelled by role when given."""
    import pandas as pd
    import seaborn as sns

    rows = [{"method": m, "domain": d if roles is None else f"{d}\n({roles.get(d, '')})", "mIoU": v}
            for m, per in results.items() for d, v in per.items()]
    fig, ax = plt.subplots(figsize=(1.3 * len({r["domain"] for r in rows}) + 2, 3.4))
    sns.barplot(pd.DataFrame(rows), x="domain", y="mIoU", hue="method", ax=ax)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.0f", fontsize=7)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def curve(x: Sequence[float], ys: Mapping[str, Sequence[float]], xlabel: str, ylabel: str = "mIoU (%)",
          title: str | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for name, y in ys.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def style_scatter(stats: Any, hue: str = "domain", title: str = "image style: channel statistics of shallow features") -> Figure:
    """Two panels from a DataFrame with columns mean, std, pc1, pc2 and `hue`: (mean, std) and a 2-D PCA."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sns.scatterplot(stats, x="mean", y="std", hue=hue, ax=axes[0], s=18, alpha=0.8)
    axes[0].set_xlabel("mean over channels of the channel means μ")
    axes[0].set_ylabel("mean over channels of σ")
    sns.scatterplot(stats, x="pc1", y="pc2", hue=hue, ax=axes[1], s=18, alpha=0.8, legend=False)
    axes[1].set_title("PCA of the per-image [μ, σ] vectors", fontsize=9)
    axes[0].legend(fontsize=7, markerscale=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def domains_figure(domains: Sequence[str], indices: Sequence[int] = (0, 1, 2), split: str = "val",
                   size: tuple[int, int] = (128, 256), with_labels: bool = True) -> Figure:
    """Paired renders: each column one layout, each row one domain (the same scenes in every style),
    and a last row with the label maps."""
    from ..data.city import render

    rows: dict[str, list[np.ndarray]] = {}
    label_row: list[np.ndarray] = []
    for name in domains:
        results = [render(name, split, i, size=size) for i in indices]
        rows[name] = [r.image for r in results]
        label_row = label_row or [colorize(r.label) for r in results]
    if with_labels:  # the first domain's label maps: shared by every domain with the same geometry
        rows[f"labels\n(as {domains[0]})"] = label_row
    present = [c for c in range(NUM_CLASSES) if c != 16]  # the city has no trains
    return image_grid(rows, col_titles=[f"layout {i}" for i in indices], legend_classes=present if with_labels else None)


def knob_sweep_figure(domain: str, knob: str, severities: Sequence[float] = range(6), index: int = 0,
                      split: str = "val", size: tuple[int, int] = (128, 256)) -> Figure:
    """One layout of `domain` with `knob` at each severity (one row)."""
    from ..data.city import KNOBS, sweep

    results = sweep(domain, knob, severities, split=split, index=index, size=size)
    fig = image_grid({f"{domain}\n{knob}": [r.image for r in results]},
                     col_titles=[f"severity {s}" for s in severities])
    fig.suptitle(f"{knob}: {KNOBS[knob].description}", fontsize=9, y=0.99)
    fig.subplots_adjust(top=0.78)
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig
