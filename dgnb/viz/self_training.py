"""Figures and an explorer for self-training (notebook 08: CBST rounds and DRSL's mixture of modes).

- `balance_figure`: per class, the share of its predicted pixels a single confidence threshold keeps and the
  share class-balanced thresholds keep, both keeping the same number of pixels overall (why CBST balances).
- `rounds_figure`: per class and round, the kept fraction and the accuracy of the pseudo labels (the
  rounds' manifests, scored by `score_pseudo_labels`).
- `mined_patches_figure`: patches of a round's training set cropped around rare classes, with their labels.
- `pixel_embeddings`: sampled pixels' MMDL-FR embeddings, classes, nearest modes and domains (for t-SNE).
- `embedding_tsne_figure`: t-SNE of those embeddings, one row per model, coloured by class, by mode and by
  domain.
- `mode_explorer`: an ipywidgets explorer: a target image and a class, its pixels coloured by the class's mode
  they are nearest to, and the MMDL class posterior.
Every figure function returns a matplotlib Figure; the explorer returns a widget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch.nn import functional as F

from ..data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize
from .figures import to_numpy_image

MODE_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                         [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


def _class_bars(ax: Any, classes: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str) -> None:
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(series))
    colours = plt.get_cmap("viridis")
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name,
               color=colours(0.15 + 0.7 * i / max(1, len(series) - 1)))
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")


def balance_figure(confidence: torch.Tensor, prediction: torch.Tensor, portion: float = 0.2,
                   title: str | None = None) -> Figure:
    """Per class predicted (ordered by share), the fraction of its pixels kept by one global confidence threshold
    and by CBST's class-balanced thresholds at `portion`; the global threshold is set to keep as many pixels
    overall as the class-balanced rule does."""
    from ..methods.self_training import portion_thresholds

    conf, pred = confidence.reshape(-1).float(), prediction.reshape(-1).long()
    theta = portion_thresholds(conf, pred, portion)
    balanced = conf >= theta[pred]
    cut = torch.sort(conf, descending=True).values[max(int(balanced.sum()) - 1, 0)]
    single = conf >= cut
    counts = torch.bincount(pred, minlength=NUM_CLASSES)[:NUM_CLASSES]
    seen = [c for c in torch.argsort(counts, descending=True).tolist() if counts[c] > 0]

    def kept(mask: torch.Tensor) -> list[float]:
        return [float(mask[pred == c].float().mean()) for c in seen]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(seen) + 2.5), 3.4))
    _class_bars(ax, [CLASSES[c] for c in seen],
                {f"one confidence threshold ({float(cut):.3f})": kept(single),
                 f"class-balanced, portion {portion:g}": kept(balanced)}, "fraction of the class's pixels kept")
    share = (counts[seen].double() / counts.sum()).tolist()
    ax.plot(np.arange(len(seen)), share, "k.", label="share of the predicted pixels")
    ax.legend(fontsize=7)
    ax.set_title(title or f"pseudo labels keeping {float(balanced.float().mean()):.0%} of the target pixels",
                 fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def rounds_figure(manifests: Sequence[Mapping[str, Any]], top: int | None = None, title: str | None = None) -> Figure:
    """Three panels over the classes predicted in the first round (by share), one bar per round: the class's
    share of the target pixels the model predicts (log scale: how the predictions drift from round to round),
    the kept fraction of those pixels, and the accuracy of the kept labels (`accuracy`, filled by
    `score_pseudo_labels`). The legend gives each round's portion, kept share and overall accuracy."""
    first = manifests[0]["predicted_share"]
    classes = sorted(first, key=lambda c: -first[c])[:top]
    names = []
    for m in manifests:
        acc = (m.get("accuracy") or {}).get("overall")
        names.append(f"round {m.get('round', len(names) + 1)}: p = {m['rule']['portion']:g}, kept "
                     f"{m['kept_overall']:.0%}" + (f", accuracy {acc:.0%}" if acc is not None else ""))
    fig, (ax_s, ax_k, ax_a) = plt.subplots(3, 1, figsize=(max(8.0, 0.55 * len(classes) + 3), 8.4), sharex=True)
    shares = {n: [m["predicted_share"].get(c, 0.0) for c in classes] for n, m in zip(names, manifests)}
    _class_bars(ax_s, classes, shares, "share of the predicted pixels")
    ax_s.set_yscale("log")
    ax_s.set_ylim(max(1e-5, min(v for vs in shares.values() for v in vs if v > 0) / 2), 1.0)
    _class_bars(ax_k, classes, {n: [m["kept_fraction"].get(c, 0.0) for c in classes] for n, m in zip(names, manifests)},
                "kept fraction of those")
    _class_bars(ax_a, classes, {n: [((m.get("accuracy") or {}).get("per_class") or {}).get(c, 0.0) for c in classes]
                                for n, m in zip(names, manifests)}, "accuracy of the kept labels")
    ax_s.legend(fontsize=7, loc="lower left")
    ax_s.set_title("what the model predicts on the target, round by round", fontsize=9)
    ax_k.set_title("what the class-balanced rule keeps of it", fontsize=9)
    ax_a.set_title("how often the kept labels are right (analysis only: the target's labels)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def mined_patches_figure(training_set: str | Path, n: int = 6, title: str | None = None) -> Figure:
    """The first `n` mined patches of a round's training set (`<root>/<name>`, patches smaller than the full
    images), each with its pseudo label; the mined classes are named in the set's manifest."""
    import json

    from PIL import Image

    from ..data.folder import load_image, load_label

    folder = Path(training_set)
    meta = json.loads((folder / "meta.json").read_text())
    with Image.open(next((folder.parent / meta["pseudo_labels"] / "train" / "labels").glob("*.png"))) as im:
        full = im.size  # the whole images' size: a mined patch is smaller
    patches = []
    for path in sorted((folder / "train" / "images").glob("t-*")):
        with Image.open(path) as im:
            if im.size == full:
                continue
        patches.append((load_image(path), load_label(folder / "train" / "labels" / f"{path.stem}.png")))
        if len(patches) == n:
            break
    mined = set(meta.get("mine_classes", []))
    cols = max(1, len(patches))
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 3.0), squeeze=False)
    for j in range(cols):
        for ax in axes[:, j]:
            ax.set_xticks([]), ax.set_yticks([])
        if j >= len(patches):
            axes[0, j].text(0.5, 0.5, "no mined patch", ha="center", va="center", fontsize=8)
            continue
        pixels, label = patches[j]
        axes[0, j].imshow(pixels)
        axes[1, j].imshow(colorize(label))
        present = [CLASSES[c] for c in np.unique(label) if c != IGNORE_INDEX and CLASSES[c] in mined]
        axes[0, j].set_title(", ".join(present) or "-", fontsize=7)
    axes[0, 0].set_ylabel("patch", fontsize=8)
    axes[1, 0].set_ylabel("pseudo label", fontsize=8)
    fig.suptitle(title or f"{meta['mined_patches']} patches mined around {', '.join(sorted(mined)) or 'no class'}",
                 fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


@torch.no_grad()
def pixel_embeddings(method: Any, images_by_domain: Mapping[str, torch.Tensor],
                     labels_by_domain: Mapping[str, torch.Tensor], per_class: int = 20, seed: int = 0,
                     batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (P, D), classes (P,), modes (P,), domains (P,)): up to `per_class` random pixels of each class
    in each image (labels reduced, nearest, to the embeddings' size), their MMDL-FR embedding, and the mode
    of their class they are nearest to (a `drsl` method)."""
    rng = np.random.default_rng(seed)
    embs, classes, modes, domains = [], [], [], []
    for name, images in images_by_domain.items():
        for i in range(0, len(images), batch_size):
            emb = method.embeddings(images[i : i + batch_size]).cpu()
            _, nearest = method.mode_maps(emb.to(method.device))
            nearest = nearest.cpu()
            small = F.interpolate(labels_by_domain[name][i : i + batch_size, None].float(), size=emb.shape[-2:],
                                  mode="nearest")[:, 0].long()
            for b in range(len(emb)):
                lab = small[b].numpy()
                for c in np.unique(lab[lab != IGNORE_INDEX]):
                    rows, cols = np.nonzero(lab == c)
                    pick = rng.choice(len(rows), min(per_class, len(rows)), replace=False)
                    r, q = rows[pick], cols[pick]
                    embs.append(emb[b][:, r, q].T.numpy())
                    classes.append(np.full(len(pick), c))
                    modes.append(nearest[b, c, r, q].numpy())
                    domains.append(np.full(len(pick), name, dtype=object))
    return np.concatenate(embs), np.concatenate(classes), np.concatenate(modes), np.concatenate(domains)


def embedding_tsne_figure(points_by_model: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                          perplexity: float = 30.0, seed: int = 0, max_points: int = 2500,
                          title: str | None = None) -> Figure:
    """One row per model: t-SNE of pixel embeddings (from `pixel_embeddings`), coloured by class (Cityscapes
    palette), by the index of the class's mode each pixel is nearest to (inside a class's island, one colour
    per sub-cluster), and by domain; source pixels are dots, the others crosses."""
    from sklearn.manifold import TSNE

    names = list(points_by_model)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 4.1 * len(names)), squeeze=False)
    rng = np.random.default_rng(seed)
    all_domains = list(dict.fromkeys(str(d) for n in names for d in points_by_model[n][3]))
    domain_colour = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(all_domains)}
    shown: set[int] = set()
    n_modes = 1
    for row, name in enumerate(names):
        emb, classes, modes, domains = (np.asarray(a) for a in points_by_model[name])
        if len(emb) > max_points:
            keep = np.sort(rng.choice(len(emb), max_points, replace=False))
            emb, classes, modes, domains = emb[keep], classes[keep], modes[keep], domains[keep]
        domains = domains.astype(str)
        shown |= set(classes.tolist())
        n_modes = max(n_modes, int(modes.max()) + 1)
        xy = TSNE(n_components=2, perplexity=min(perplexity, max(2.0, (len(emb) - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(np.asarray(emb, np.float32))
        colours = (PALETTE[classes] / 255, MODE_COLOURS[modes % len(MODE_COLOURS)] / 255,
                   np.array([domain_colour[d] for d in domains]))
        for col, (ax, colour) in enumerate(zip(axes[row], colours)):
            for k, dom in enumerate(all_domains):
                sel = domains == dom
                ax.scatter(xy[sel, 0], xy[sel, 1], c=colour[sel], s=8 if k == 0 else 14, marker="o" if k == 0 else "x",
                           alpha=0.75, linewidths=0 if k == 0 else 0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(("by class", "by the class's nearest mode", "by domain")[col], fontsize=10)
        axes[row, 0].set_ylabel(name, fontsize=10)
    class_handles = [Line2D([], [], marker="o", ls="", color=PALETTE[c] / 255, label=CLASSES[c]) for c in sorted(shown)]
    mode_handles = [Line2D([], [], marker="o", ls="", color=MODE_COLOURS[j] / 255, label=f"mode {j + 1}")
                    for j in range(n_modes)]
    domain_handles = [Line2D([], [], marker="o" if k == 0 else "x", ls="", color=domain_colour[d], label=d)
                      for k, d in enumerate(all_domains)]
    for ax, handles, ncol in ((axes[-1, 0], class_handles, 3), (axes[-1, 1], mode_handles, n_modes),
                              (axes[-1, 2], domain_handles, 2)):
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=ncol, fontsize=7,
                  frameon=False)
    fig.suptitle(title or "t-SNE of MMDL-FR pixel embeddings", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def mode_overlay(image: np.ndarray, mask: np.ndarray, modes: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """The image greyed out, and the pixels of `mask` coloured by their mode index (MODE_COLOURS)."""
    img = to_numpy_image(image).astype(np.float32)
    out = np.repeat(img.mean(-1, keepdims=True), 3, -1) * 0.6
    out[mask] = (1 - alpha) * img[mask] + alpha * MODE_COLOURS[modes[mask] % len(MODE_COLOURS)]
    return out.round().astype(np.uint8)


def mode_explorer(method: Any, images: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
    """Pick a target image and a class: the image, the segmentation head's prediction, the pixels of the class
    (predicted, or labelled when `labels` are given and chosen) coloured by the mode of that class they are
    nearest to, and the MMDL-FR posterior P(C = class | e). `method` is a trained `drsl` method."""
    import ipywidgets as widgets

    from .explorers import _explorer

    with torch.no_grad():
        preds = torch.cat([method.predict(images[i : i + 8].to(method.device)).argmax(1).cpu()
                           for i in range(0, len(images), 8)])
        emb = torch.cat([method.embeddings(images[i : i + 8]).cpu() for i in range(0, len(images), 8)])
        posterior, nearest = method.mode_maps(emb.to(method.device))
    size = images.shape[-2:]
    posterior = F.interpolate(posterior.cpu(), size=size, mode="bilinear", align_corners=False)
    nearest = F.interpolate(nearest.cpu().float(), size=size, mode="nearest").long()
    sources = ["segmentation prediction"] + (["ground truth"] if labels is not None else [])
    controls = {"image": widgets.IntSlider(0, 0, len(images) - 1, description="target image"),
                "class": widgets.Dropdown(options=[(c, i) for i, c in enumerate(CLASSES)], value=13,
                                          description="class"),
                "pixels": widgets.Dropdown(options=sources, value=sources[0], description="pixels of")}

    def draw() -> Figure:
        i, c = controls["image"].value, controls["class"].value
        img = to_numpy_image(images[i])
        which = preds[i] if controls["pixels"].value == sources[0] else labels[i]
        mask = (which == c).numpy()
        modes = nearest[i, c].numpy()
        counts = np.bincount(modes[mask], minlength=method.hp.num_modes)
        fig, axes = plt.subplots(1, 4, figsize=(14, 2.6))
        pics = [(img, "image", None), (colorize(preds[i].numpy()), "segmentation head", None),
                (mode_overlay(img, mask, modes), f"'{CLASSES[c]}' pixels per mode: "
                 + " / ".join(f"{n}" for n in counts), None),
                (posterior[i, c].numpy(), f"MMDL posterior P({CLASSES[c]} | e)", "viridis")]
        for ax, (pic, head, cmap) in zip(axes, pics):
            ax.imshow(pic, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_title(head, fontsize=8)
            ax.axis("off")
        handles = [Line2D([], [], marker="s", ls="", color=MODE_COLOURS[j] / 255, label=f"mode {j + 1}")
                   for j in range(method.hp.num_modes)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, -0.04))
        fig.tight_layout()
        return fig

    return _explorer(controls, [["image", "class", "pixels"]], draw)
