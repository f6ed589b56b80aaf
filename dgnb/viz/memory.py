"""Figures for memory-based methods (Pin the Memory, Fig. 5 and Fig. 6 of the paper).

- `class_mean_features`: one point per (image, class): the mean of the l2-normalised encoder
  feature F over the class's pixels (the official t-SNE recipe), for any method with a Segmenter.
- `tsne_features_figure`: those points (and the memory slots, as triangles, embedded together with
  them) in 2-D with t-SNE, coloured by class and by domain, one row per model.
- `memory_activation_figure`: the read weights W of Eq. 4 for chosen slots, normalised per pixel
  across slots and blended over the image (viridis, alpha 0.65).
Every function returns a matplotlib Figure.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch.nn import functional as F

from ..data.taxonomy import CLASSES, NUM_CLASSES, PALETTE
from .figures import overlay, to_numpy_image

TsneInput = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


@torch.no_grad()
def class_mean_features(method, images_by_domain: Mapping[str, torch.Tensor],
                        labels_by_domain: Mapping[str, torch.Tensor], min_fraction: float = 0.002,
                        batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (P, C), classes (P,), domains (P,)): per image and class present, the mean of
    l2-normalised F (before any memory) over that class's pixels (labels area-downsampled to F).

    A class counts as present in an image when it covers at least `min_fraction` of its pixels.
    """
    from ..methods.pinthemem import class_masks

    model = method.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, classes, domains = [], [], []
    for name, images in images_by_domain.items():
        labels = labels_by_domain[name]
        for i in range(0, len(images), batch_size):
            q = F.normalize(model.encode(images[i : i + batch_size].to(device))[1].float(), dim=1)
            masks = class_masks(labels[i : i + batch_size].to(device), q.shape[-2:], NUM_CLASSES)  # (B, N, h, w)
            counts = masks.sum((2, 3))
            means = torch.einsum("bnhw,bchw->bnc", masks, q) / counts.clamp_min(1e-6).unsqueeze(-1)
            keep = counts / masks[0, 0].numel() >= min_fraction
            b, n = keep.nonzero(as_tuple=True)
            feats.append(means[b, n].cpu().numpy())
            classes.append(n.cpu().numpy())
            domains.append(np.full(len(n), name, dtype=object))
    model.train(was_training)
    return np.concatenate(feats), np.concatenate(classes), np.concatenate(domains)


def _embed(points: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """t-SNE of l2-normalised rows, coordinates min-max normalised to [0, 1] (official recipe)."""
    from sklearn.manifold import TSNE

    x = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))
    y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return (y - y.min(0)) / np.maximum(y.max(0) - y.min(0), 1e-12)


def tsne_features_figure(features_by_model: Mapping[str, TsneInput], perplexity: float = 30.0, seed: int = 0,
                         max_points: int = 3000, title: str | None = None) -> Figure:
    """One row per model: t-SNE of (features, classes, domains, memory | None), coloured by class
    (Cityscapes palette) and by domain; memory slots of the classes shown are black-edged triangles
    embedded together with the pixels' class means (Fig. 5 of Pin the Memory). The memory is written
    from U(F), not F, so its slots need not sit inside their class's cloud (the official plot too).
    Rows are l2-normalised; t-SNE is run per model (perplexity capped at (P − 1) / 3)."""
    names = list(features_by_model)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 4.2 * len(names)), squeeze=False)
    rng = np.random.default_rng(seed)
    all_domains: list[str] = []
    for name in names:
        all_domains += [str(d) for d in np.unique(features_by_model[name][2].astype(str)) if str(d) not in all_domains]
    domain_colour = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(all_domains)}
    shown_classes: set[int] = set()
    for row, name in enumerate(names):
        feats, classes, domains, memory = features_by_model[name]
        feats, classes, domains = np.asarray(feats, np.float32), np.asarray(classes), np.asarray(domains).astype(str)
        if len(feats) > max_points:
            keep = np.sort(rng.choice(len(feats), max_points, replace=False))
            feats, classes, domains = feats[keep], classes[keep], domains[keep]
        slots = np.unique(classes) if memory is not None else np.array([], dtype=int)
        points = feats if memory is None else np.concatenate([feats, np.asarray(memory, np.float32)[slots]])
        xy = _embed(points, perplexity, seed)
        pix, mem = xy[: len(feats)], xy[len(feats) :]
        shown_classes |= set(classes.tolist())
        ax_c, ax_d = axes[row]
        ax_c.scatter(pix[:, 0], pix[:, 1], c=PALETTE[classes] / 255, s=9, alpha=0.8, linewidths=0)
        ax_d.scatter(pix[:, 0], pix[:, 1], c=[domain_colour[d] for d in domains], s=9, alpha=0.8, linewidths=0)
        if len(mem):
            ax_c.scatter(mem[:, 0], mem[:, 1], c=PALETTE[slots] / 255, marker="^", s=220, edgecolors="black",
                         linewidths=1.5, zorder=3)
            ax_d.scatter(mem[:, 0], mem[:, 1], c="black", marker="^", s=220, edgecolors="white", linewidths=1.0,
                         zorder=3)
        ax_c.set_ylabel(name, fontsize=10)
        for ax, what in ((ax_c, "by class"), (ax_d, "by domain")):
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(what, fontsize=10)
    class_handles = [Line2D([], [], marker="o", ls="", color=PALETTE[c] / 255, label=CLASSES[c])
                     for c in sorted(shown_classes)]
    domain_handles = [Line2D([], [], marker="o", ls="", color=domain_colour[d], label=d) for d in all_domains]
    if any(features_by_model[n][3] is not None for n in names):
        domain_handles.append(Line2D([], [], marker="^", ls="", color="black", markersize=9, label="memory slot"))
    axes[-1, 0].legend(handles=class_handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7,
                       frameon=False)
    axes[-1, 1].legend(handles=domain_handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=7,
                       frameon=False)
    fig.suptitle(title or "t-SNE of per-image class means of the l2-normalised encoder feature F", fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def normalized_activation(weights: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """W (K, h, w) upsampled bilinearly to `size`, then per pixel: (W − min over slots) / max of that."""
    w = torch.as_tensor(weights).float()[None]
    w = F.interpolate(w, size=size, mode="bilinear", align_corners=False)[0]
    w = w - w.min(0, keepdim=True).values
    return (w / w.max(0, keepdim=True).values.clamp_min(1e-12)).numpy()


def memory_activation_figure(image: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray,
                             slots: Sequence[int], class_names: Sequence[str] = CLASSES,
                             label: np.ndarray | torch.Tensor | None = None, alpha: float = 0.65,
                             ncols: int = 4) -> Figure:
    """The image (and ground truth if given), then one panel per memory slot in `slots`: the slot's
    read weight (Eq. 4), normalised per pixel across slots, viridis-blended over the image (Fig. 6)."""
    img = to_numpy_image(image)
    act = normalized_activation(weights, img.shape[:2])
    panels = [("image", img)]
    if label is not None:
        panels.append(("ground truth", overlay(img, np.asarray(torch.as_tensor(label).cpu()))))
    cmap = plt.get_cmap("viridis")
    for s in slots:
        heat = (cmap(act[s])[..., :3] * 255).astype(np.float32)
        panels.append((f"slot: {class_names[s]}", ((1 - alpha) * img + alpha * heat).round().astype(np.uint8)))
    h, w = img.shape[:2]
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 0.6, (3.0 * h / w + 0.35) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, picture) in zip(axes.flat, panels):
        ax.imshow(picture)
        ax.set_title(title, fontsize=8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="relative read weight")
    if label is not None:  # the colours of the ground-truth panel
        from .figures import class_legend

        values = np.unique(np.asarray(torch.as_tensor(label).cpu()))
        class_legend(fig, [int(c) for c in values if c < NUM_CLASSES])
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def slot_similarity_figure(memories: Mapping[str, torch.Tensor], classes: Sequence[int] | None = None) -> Figure:
    """Cosine similarity <M[n], M[n']> between memory slots (rows are unit-norm), one panel per memory.

    `classes`: the slots to show (default: all), e.g. the classes present in the data."""
    classes = list(range(NUM_CLASSES)) if classes is None else list(classes)
    fig, axes = plt.subplots(1, len(memories), figsize=(5.2 * len(memories), 4.6), squeeze=False)
    ticks = [CLASSES[c] for c in classes]
    for ax, (title, m) in zip(axes[0], memories.items()):
        m = F.normalize(m.detach().float().cpu()[classes], dim=1)
        im = ax.imshow((m @ m.T).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.025, label="cosine similarity")
    plt.close(fig)
    return fig


StepRow = tuple[str, Sequence[tuple[str, str]]]


def step_table_figure(steps: Sequence[StepRow], groups: Sequence[str], kinds: Mapping[str, tuple[str, str]],
                      title: str) -> Figure:
    """A steps x parameter-groups table of coloured cells: which step touches which parameters, and how.

    steps: [(step label, [(kind, cell text) per group])]; kinds: kind -> (colour, legend label).
    Used for the meta-learning episode of Pin the Memory (Alg. 1) in notebook 03."""
    from matplotlib.patches import Patch, Rectangle

    fig, ax = plt.subplots(figsize=(11, 0.6 * len(steps) + 1.9))
    for r, (step, cells) in enumerate(steps):
        y = len(steps) - 1 - r
        ax.text(-0.08, y + 0.5, step, ha="right", va="center", fontsize=9)
        for c, (kind, text) in enumerate(cells):
            ax.add_patch(Rectangle((c, y), 1, 1, facecolor=kinds[kind][0], edgecolor="white", lw=2))
            ax.text(c + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8)
    for c, group in enumerate(groups):
        ax.text(c + 0.5, len(steps) + 0.1, group, ha="center", va="bottom", fontsize=9, weight="bold")
    ax.set_xlim(-1.9, len(groups))
    ax.set_ylim(0, len(steps) + 0.9)
    ax.axis("off")
    ax.legend(handles=[Patch(facecolor=colour, edgecolor="grey", label=label) for colour, label in kinds.values()],
              loc="upper center", bbox_to_anchor=(0.6, -0.01), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def memory_over_training_figure(snapshots: dict, probe_index: int = 0, slots: Sequence[int] | None = None,
                                alpha: float = 0.65) -> Figure:
    """Read weights over training, from a run's snapshots (`Run.snapshots`): one row per evaluation
    point, the probe image's ground truth then one panel per slot in `slots` (read weight of Eq. 4,
    normalised per pixel across slots, viridis-blended over the image), with a class legend. The
    static companion of `memory_training_explorer`."""
    from .figures import class_legend

    probe, snaps = snapshots["probe"], snapshots["snapshots"]
    slots = [CLASSES.index(c) for c in ("road", "building", "vegetation", "car")] if slots is None else list(slots)
    img = to_numpy_image(probe["image"][probe_index])
    label = probe["label"][probe_index].numpy().astype(np.int64)
    h, w = img.shape[:2]
    ncols = 1 + len(slots)
    fig, axes = plt.subplots(len(snaps), ncols, figsize=(2.6 * ncols, (2.6 * h / w + 0.3) * len(snaps) + 0.9),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, snap in enumerate(snaps):
        act = normalized_activation(snap["read_weights"][probe_index].float(), (h, w))
        panels = [overlay(img, label)] + [((1 - alpha) * img + alpha * cmap(act[s])[..., :3] * 255).round()
                                          .astype(np.uint8) for s in slots]
        for c, (ax, picture) in enumerate(zip(axes[r], panels)):
            ax.imshow(picture)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("ground truth" if c == 0 else f"slot: {CLASSES[slots[c - 1]]}", fontsize=8)
        axes[r, 0].set_ylabel(f"iteration {snap['iteration']}", fontsize=8)
    fig.suptitle(f"read weights of the {probe['domain'][probe_index]} probe image at each evaluation", fontsize=10)
    fig.tight_layout()
    present = [int(c) for c in np.unique(label) if c < NUM_CLASSES]
    fig.subplots_adjust(bottom=min(0.12, 0.5 / fig.get_figheight()), right=0.92)
    class_legend(fig, present)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, cax=fig.add_axes((0.935, 0.2, 0.012, 0.6)), label="relative read weight")
    plt.close(fig)
    return fig


def slot_separation(snapshots: dict, classes: Sequence[int] | None = None) -> dict[int, float]:
    """{iteration: mean over pairs of distinct slots (in `classes`) of max(cos, 0)}: how far the
    divergence loss has pushed the slots apart at each evaluation point (0: orthogonal)."""
    out = {}
    for snap in snapshots["snapshots"]:
        m = F.normalize(snap["memory"].float(), dim=1)
        if classes is not None:
            m = m[list(classes)]
        sims = (m @ m.T).clamp_min(0)
        n = len(m)
        out[int(snap["iteration"])] = float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
    return out
