"""Figures and the explorer of notebook 04 (style): style distributions, style maps with the SPC bases,
semantic t-SNE with the semantic bases, ISW covariances and mask, severity curves per method."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..data.taxonomy import CLASSES, PALETTE
from .explorers import _explorer, _present
from .figures import overlay, to_numpy_image

Stats = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # domain -> (μ (N, C), σ (N, C))


def _domain_colours(names: Sequence[str]) -> dict[str, Any]:
    return {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(names)}


def discriminative_channels(stats: Stats, top: int = 4) -> list[int]:
    """The channels whose μ differs most between domains relative to within (Fisher ratio), best first."""
    means = torch.stack([mu.mean(0) for mu, _ in stats.values()])
    within = torch.stack([mu.var(0, unbiased=False) for mu, _ in stats.values()]).mean(0)
    ratio = means.var(0, unbiased=False) / within.clamp_min(1e-8)
    return ratio.argsort(descending=True)[:top].tolist()


def style_distribution_figure(stats_by_stage: Mapping[str, Stats], channels: int = 4,
                              kind: str = "violin") -> Figure:
    """Per stage, the distribution over images of μ_c and σ_c for the `channels` most domain-dependent
    channels, one colour per domain (seaborn violins, or KDE curves of the channel-averaged μ and σ)."""
    import pandas as pd
    import seaborn as sns

    stages = list(stats_by_stage)
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.0 * len(stages)), squeeze=False)
    for row, stage in enumerate(stages):
        stats = stats_by_stage[stage]
        picked = discriminative_channels(stats, channels)
        for col, (what, index) in enumerate((("μ (channel mean)", 0), ("σ (channel std)", 1))):
            ax = axes[row, col]
            if kind == "violin":
                records = [{"domain": d, "channel": f"c{c}", "value": float(v)}
                           for d, s in stats.items() for c in picked for v in s[index][:, c]]
                sns.violinplot(pd.DataFrame(records), x="channel", y="value", hue="domain", ax=ax, cut=0,
                               density_norm="width", linewidth=0.6, legend=(row == 0 and col == 0))
            else:
                records = [{"domain": d, "value": float(v)} for d, s in stats.items() for v in s[index].mean(1)]
                sns.kdeplot(pd.DataFrame(records), x="value", hue="domain", ax=ax, fill=True, alpha=0.25,
                            common_norm=False, legend=(row == 0 and col == 0))
            ax.set_title(f"{stage}: {what}" + (" of the most domain-dependent channels" if kind == "violin" else
                                                " averaged over channels"), fontsize=9)
            ax.set_xlabel("")
    leg = axes[0, 0].get_legend()
    if leg is not None:
        sns.move_legend(axes[0, 0], "upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, title=None, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _fit_2d(points: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(points)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(points) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def style_map(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray] | None, bases: np.ndarray | None,
              method: str = "pca", seed: int = 0) -> dict[str, Any]:
    """2-D coordinates of style vectors [μ, σ] (one per image) before and after the projection, and of the
    bases: PCA is fitted on the unprojected vectors and the bases (the same axes for both panels); t-SNE
    embeds everything together. Standardised per dimension first. Returns {"before", "after", "bases",
    "transform"} (transform: maps new vectors onto the PCA plane; None for t-SNE)."""
    names = list(before)
    groups = [np.asarray(before[d]) for d in names] + ([np.asarray(after[d]) for d in names] if after else [])
    if bases is not None:
        groups.append(np.asarray(bases))
    allv = np.concatenate(groups)
    ref = np.concatenate([np.asarray(before[d]) for d in names] + ([np.asarray(bases)] if bases is not None else []))
    mean, std = ref.mean(0), ref.std(0) + 1e-6
    transform = None
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit((ref - mean) / std)

        def transform(v: np.ndarray) -> np.ndarray:
            return pca.transform((np.asarray(v) - mean) / std)

        xy = transform(allv)
    else:
        xy = _fit_2d((allv - mean) / std, method, seed)
    out: dict[str, Any] = {"before": {}, "after": {}, "bases": None, "transform": transform}
    i = 0
    for d in names:
        out["before"][d] = xy[i : i + len(before[d])]
        i += len(before[d])
    if after:
        for d in names:
            out["after"][d] = xy[i : i + len(after[d])]
            i += len(after[d])
    if bases is not None:
        out["bases"] = xy[i:]
    return out


def _scatter_map(ax, points: Mapping[str, np.ndarray], bases: np.ndarray | None, colours: Mapping[str, Any],
                 roles: Mapping[str, str] | None = None) -> None:
    for d, xy in points.items():
        marker = "o" if roles is None or roles.get(d) == "source" else "x"
        ax.scatter(xy[:, 0], xy[:, 1], s=16, color=colours[d], marker=marker, alpha=0.75, label=d, linewidths=1)
    if bases is not None:
        ax.scatter(bases[:, 0], bases[:, 1], marker="*", s=380, c="gold", edgecolors="black", linewidths=1.2,
                   zorder=4, label="style bases")
    ax.set_xticks([]), ax.set_yticks([])


def style_space_figure(maps: Mapping[str, Mapping[str, Any]], roles: Mapping[str, str] | None = None) -> Figure:
    """One row per (stage, reduction): per-image style vectors by domain (circles: sources, crosses: unseen),
    the style bases as stars; left before the projection, right after it (the projected μ', σ')."""
    rows = list(maps)
    names = list(next(iter(maps.values()))["before"])
    colours = _domain_colours(names)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
    for r, key in enumerate(rows):
        m = maps[key]
        _scatter_map(axes[r, 0], m["before"], m["bases"], colours, roles)
        axes[r, 0].set_title(f"{key}: before projection (μ, σ)", fontsize=9)
        if m["after"]:
            _scatter_map(axes[r, 1], m["after"], m["bases"], colours, roles)
            axes[r, 1].set_title(f"{key}: after projection (μ', σ')", fontsize=9)
            # same limits on both panels (PCA: same axes), so the pull toward the bases is visible
            both = np.concatenate([*m["before"].values(), *m["after"].values()]
                                  + ([m["bases"]] if m["bases"] is not None else []))
            lo, hi = both.min(0), both.max(0)
            pad = 0.05 * (hi - lo)
            for ax in axes[r]:
                ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
                ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        else:
            axes[r, 1].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    plt.close(fig)
    return fig


@torch.no_grad()
def sample_embeddings(method, images_by_domain: Mapping[str, torch.Tensor], labels_by_domain: Mapping[str, torch.Tensor],
                      per_class: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (P, D), classes (P,), domains (P,)): up to `per_class` random pixels per class and domain
    of SPC's pixel embeddings e (labels nearest-resized to e's size; ignore pixels skipped)."""
    from torch.nn import functional as F

    rng = np.random.default_rng(seed)
    feats, classes, domains = [], [], []
    for name, images in images_by_domain.items():
        e = torch.cat([method.embed(images[i : i + 8]) for i in range(0, len(images), 8)])
        y = F.interpolate(labels_by_domain[name][:, None].float(), size=e.shape[-2:], mode="nearest")[:, 0].long()
        flat_e = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]).numpy()
        flat_y = y.reshape(-1).numpy()
        for c in np.unique(flat_y):
            if c >= len(CLASSES):
                continue
            idx = np.flatnonzero(flat_y == c)
            idx = rng.choice(idx, min(per_class, len(idx)), replace=False)
            feats.append(flat_e[idx])
            classes.append(np.full(len(idx), c))
            domains.append(np.full(len(idx), name, dtype=object))
    return np.concatenate(feats), np.concatenate(classes), np.concatenate(domains)


def semantic_tsne_figure(embeddings: np.ndarray, classes: np.ndarray, domains: np.ndarray, bases: torch.Tensor,
                         seed: int = 0) -> Figure:
    """t-SNE of pixel embeddings coloured by class (left) and by domain (right), with the semantic bases
    P_{c,m} of the classes shown as black-edged squares (embedded together with the pixels)."""
    shown = np.unique(classes)
    p = bases[torch.as_tensor(shown)].reshape(-1, bases.shape[-1]).numpy()
    base_classes = np.repeat(shown, bases.shape[1])
    xy = _fit_2d(np.concatenate([embeddings, p]), "tsne", seed)
    pix, bxy = xy[: len(embeddings)], xy[len(embeddings) :]
    names = list(dict.fromkeys(domains.astype(str)))
    colours = _domain_colours(names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    axes[0].scatter(pix[:, 0], pix[:, 1], c=PALETTE[classes] / 255, s=7, alpha=0.75, linewidths=0)
    axes[1].scatter(pix[:, 0], pix[:, 1], c=[colours[d] for d in domains.astype(str)], s=7, alpha=0.75, linewidths=0)
    axes[0].scatter(bxy[:, 0], bxy[:, 1], c=PALETTE[base_classes] / 255, marker="s", s=120, edgecolors="black",
                    linewidths=1.4, zorder=3)
    axes[1].scatter(bxy[:, 0], bxy[:, 1], c="black", marker="s", s=90, edgecolors="white", zorder=3)
    axes[0].set_title("pixel embeddings by class (squares: semantic bases)", fontsize=9)
    axes[1].set_title("the same points by domain", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0].legend(handles=[Line2D([], [], marker="o", ls="", color=PALETTE[c] / 255, label=CLASSES[c]) for c in shown],
                   loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=4, fontsize=7, frameon=False)
    axes[1].legend(handles=[Line2D([], [], marker="o", ls="", color=colours[d], label=d) for d in names]
                   + [Line2D([], [], marker="s", ls="", color="black", label="semantic base")],
                   loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def covariance_figure(covs: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> Figure:
    """|Σ| of one image per domain (clamped to 1, RobustNet's picture), and the selected ISW mask."""
    panels = list(covs.items()) + ([("selected mask S (style-sensitive pairs)", mask)] if mask is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
    for k, (ax, (title, m)) in enumerate(zip(axes[0], panels)):
        is_mask = mask is not None and k == len(panels) - 1
        shown = ax.imshow(m.abs().clamp(max=1).numpy(), cmap="Greys" if is_mask else "magma", vmin=0, vmax=1)
        if not is_mask:
            im = shown
        ax.set_title(title if is_mask else f"|Σ| {title}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[0, : len(covs)].tolist(), shrink=0.8, label="|covariance| (clamped to 1)")
    plt.close(fig)
    return fig


def variance_histogram_figure(variance: torch.Tensor, centres: torch.Tensor, mask: torch.Tensor, stage: str = "") -> Figure:
    """Histogram (log x) of the upper-triangle variances V of the photometric pairs, with the k-means
    cluster boundaries as dashed lines; the shaded part of each bar is what ended in the mask."""
    from ..methods.isw import cluster_boundaries, upper_triangle

    up = upper_triangle(variance.shape[0])
    v = variance[up].numpy()
    sel = mask[up].numpy() > 0
    bins = np.logspace(np.log10(max(v.min(), 1e-12)), np.log10(v.max() + 1e-12), 50)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.hist(v, bins=bins, color="lightgrey", label="all channel pairs")
    ax.hist(v[sel], bins=bins, color="tab:red", alpha=0.8, label="in the mask (all trials)")
    for b in cluster_boundaries(centres[centres != 0] if (centres != 0).sum() > 1 else centres).numpy():
        ax.axvline(b, color="black", ls="--", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("variance of the covariance entry under a photometric change")
    ax.set_ylabel("channel pairs")
    ax.set_title(f"ISW {stage}: {int(sel.sum())} of {len(v)} pairs selected; dashed: k-means boundaries", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def severity_figure(curves: Mapping[str, Mapping[str, Mapping[int, float]]], geometric: Sequence[str] = ()) -> Figure:
    """One panel per knob: mIoU against severity, one line per method (`curves[knob][method][severity]`)."""
    knobs = list(curves)
    cols = min(3, len(knobs))
    rows = (len(knobs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, knob in zip(axes.flat, knobs):
        for method, per in curves[knob].items():
            ax.plot(list(per), list(per.values()), marker="o", ms=3, label=method)
        ax.set_title(knob + (" (geometric control)" if knob in geometric else ""), fontsize=9)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("mIoU (%)")
    for ax in list(axes.flat)[len(knobs):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def style_explorer(methods: Mapping[str, Any], spc, images_by_domain: Mapping[str, torch.Tensor],
                   labels_by_domain: Mapping[str, torch.Tensor], style_plane: Mapping[str, Any],
                   stage: str = "stem") -> widgets.Widget:
    """Choose an unseen-domain image: SPC's λ over the style bases at `stage`, the image's style vector
    before and after the projection on the 2-D style map (`style_plane`: a PCA `style_map` of that stage),
    and the predictions of every method in `methods` (label -> method) next to the ground truth."""
    names = list(images_by_domain)
    controls = {"domain": widgets.Dropdown(options=names, description="unseen domain"),
                "image": widgets.IntSlider(0, 0, len(images_by_domain[names[0]]) - 1, description="image")}
    c = controls
    colours = _domain_colours(list(style_plane["before"]))

    def draw() -> Figure:
        c["image"].max = len(images_by_domain[c["domain"].value]) - 1
        i = c["image"].value
        image = images_by_domain[c["domain"].value][i : i + 1]
        label = labels_by_domain[c["domain"].value][i].numpy()
        read = spc.style_readout(image)
        lam = read[f"{stage}.lambda"][0].numpy()
        before = np.concatenate([read[f"{stage}.mu"], read[f"{stage}.sigma"]], 1)
        after = np.concatenate([read[f"{stage}.mu_proj"], read[f"{stage}.sigma_proj"]], 1)
        img = to_numpy_image(image[0])
        preds = {}
        for name, m in methods.items():
            with torch.no_grad():
                preds[name] = m.predict(image.to(next(m.parameters()).device)).argmax(1)[0].cpu().numpy()
        fig = plt.figure(figsize=(3.2 * (len(methods) + 2), 5.4))
        grid = fig.add_gridspec(2, len(methods) + 2)
        ax = fig.add_subplot(grid[0, 0])
        ax.bar(range(len(lam)), lam, color="gold", edgecolor="black")
        ax.set_title(f"λ over the {len(lam)} style bases ({stage})", fontsize=9)
        ax.set_xlabel("style base")
        ax.set_xticks(range(len(lam)))
        ax.set_ylim(0, 1)
        ax = fig.add_subplot(grid[0, 1:3])
        _scatter_map(ax, style_plane["before"], style_plane["bases"], colours)
        p0, p1 = style_plane["transform"](before)[0], style_plane["transform"](after)[0]
        ax.annotate("", xy=p1, xytext=p0, arrowprops={"arrowstyle": "->", "lw": 2, "color": "black"})
        ax.scatter(*p0, s=140, c="none", edgecolors="red", linewidths=2, zorder=5, label="this image")
        ax.scatter(*p1, s=140, marker="D", c="red", zorder=5, label="after projection")
        ax.legend(fontsize=6, loc="best")
        ax.set_title("its style vector on the map (PCA of the sources' and targets' styles)", fontsize=9)
        pictures = [("image", img), ("ground truth", overlay(img, label))] + [(n, overlay(img, p)) for n, p in preds.items()]
        for k, (title, pic) in enumerate(pictures):
            ax = fig.add_subplot(grid[1, k])
            ax.imshow(pic)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        from .figures import class_legend

        fig.subplots_adjust(bottom=0.12)
        class_legend(fig, _present(label, *preds.values()))
        return fig

    return _explorer(controls, [["domain", "image"]], draw)
