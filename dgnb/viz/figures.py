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


def seed_intervals_figure(runs: Sequence[Mapping[str, Any]], reference: str | None = None,
                          labels: Mapping[str, str] | None = None, title: str | None = None) -> Figure:
    """Results as intervals, from `dgnb bench` records (method, seed, target_miou, mean_target_miou).

    Left: every seed as a dot, per target and for the mean target, with each method's mean and 95%
    t-interval over its seeds. Right: the paired (same-seed) difference of each method to `reference`
    (default: the first method), mean and 95% interval; an interval that crosses the dashed zero line
    is not resolved by these seeds.
    """
    import seaborn as sns

    from ..analysis import compare_runs, t_quantile

    labels = dict(labels or {})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    reference = reference or methods[0]
    targets = list(runs[0]["target_miou"])
    columns = targets + ["mean target"]
    colors = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(3.0 + 1.5 * len(columns), 3.8),
                                 gridspec_kw={"width_ratios": [len(columns), max(2, len(columns) // 2)]})
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rs = [r for r in runs if r["method"] == method]
        for j, col in enumerate(columns):
            vals = np.array([r["mean_target_miou"] if col == "mean target" else r["target_miou"][col] for r in rs])
            x = j - 0.4 + width * (k + 0.5)
            ax.scatter(np.full(len(vals), x) + np.linspace(-width / 5, width / 5, len(vals)), vals, s=9,
                       color=colors[method], alpha=0.55, lw=0)
            half = t_quantile(0.95, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0
            ax.errorbar(x, vals.mean(), yerr=half, fmt="o", color=colors[method], ms=5, capsize=3,
                        label=labels.get(method, method) if j == 0 else None)
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    n_seeds = len({r["seed"] for r in runs})
    ax.set_title(title or f"dots: seeds ({n_seeds}); bars: mean and 95% interval", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    comp = compare_runs(runs, reference)
    others = [m for m in methods if m != reference]
    for k, method in enumerate(others):
        d = comp[method]["mean_target"]
        bx.errorbar(k, d["mean"], yerr=d["half_width"] if np.isfinite(d["half_width"]) else 0, fmt="o",
                    color=colors[method], capsize=4)
        bx.annotate("resolved" if d["excludes_zero"] else "not resolved", (k, d["high"] if np.isfinite(d["high"]) else d["mean"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    bx.axhline(0, color="k", ls="--", lw=0.8)
    bx.set_xticks(range(len(others)), [labels.get(m, m) for m in others], fontsize=8, rotation=15)
    bx.set_xlim(-0.6, len(others) - 0.4)
    bx.set_ylabel(f"mean target mIoU − {labels.get(reference, reference)} (points)")
    bx.set_title("paired difference, 95% interval", fontsize=9)
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
