"""Figures and an explorer for unsupervised domain adaptation (notebooks 05 and 06).

- `head_outputs`: for any method with a Segmenter, per image the primary and auxiliary class scores.
- `entropy_maps_figure`: target images, their labels, and for each model its prediction and its
  normalised entropy map (ADVENT's motivating picture).
- `adversarial_history_figure`: the discriminators' losses and mean outputs on source and target, and
  the segmenter's adversarial terms, over training (from `Run.history`).
- `disagreement_figure`: per-pixel KL(P_a ‖ P_p) between the auxiliary and primary classifiers on source
  and target images (MRNet Fig. 1), shown as log(1 + 10 KL) like the official code.
- `disagreement_error_figure`: the error rate of the primary prediction per bin of disagreement.
- `pseudo_label_figure`: per class, the kept fraction and the accuracy of pseudo labels (their manifest).
- `uda_results`: one seed's runs of a UDA pair as a table (source val, every target, train time) and
  grouped bars per domain, the adapted target marked (notebooks 05 and 07).
- `uda_explorer`: an ipywidgets explorer over target images: both heads, their disagreement, the fusion.
Every figure function returns a matplotlib Figure; the explorer returns a widget.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch.nn import functional as F

from ..data.taxonomy import CLASSES, IGNORE_INDEX, colorize
from .figures import class_legend, domain_bars, to_numpy_image
from .training import history_series


@torch.no_grad()
def head_outputs(method: Any, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_p, z_a) on CPU: primary and auxiliary (layer3) class scores at input size, in eval mode."""
    model = method.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mains, auxs = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        stages, feats = model.encode(x)
        mains.append(model.decode(feats, stages, x.shape[-2:]).float().cpu())
        aux = model.aux_head(stages["layer3"])
        auxs.append(F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False).float().cpu())
    model.train(was_training)
    return torch.cat(mains), torch.cat(auxs)


def _entropy(probs: torch.Tensor) -> np.ndarray:
    from ..methods.uda import entropy_map

    return entropy_map(probs).numpy()


def entropy_maps_figure(images: torch.Tensor, labels: torch.Tensor, probs_by_model: Mapping[str, torch.Tensor],
                        title: str | None = None) -> Figure:
    """One row per image: image, ground truth, then for each model its prediction and its entropy map
    (normalised entropy in [0, 1], viridis: bright = uncertain)."""
    names = list(probs_by_model)
    n = len(images)
    cols = 2 + 2 * len(names)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.15 * n + 0.8), squeeze=False)
    present: set[int] = set()
    for r in range(n):
        lab = labels[r].numpy()
        present |= set(np.unique(lab[lab != IGNORE_INDEX]).tolist())
        panels = [(to_numpy_image(images[r]), "image", None), (colorize(lab), "ground truth", None)]
        for name in names:
            p = probs_by_model[name][r : r + 1]
            panels.append((colorize(p.argmax(1)[0].numpy()), f"{name}: prediction", None))
            ent = _entropy(p)[0]
            panels.append((ent, f"{name}: entropy (mean {ent.mean():.2f})", "viridis"))
        for c, (pic, head, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(pic, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(head, fontsize=7)
    fig.suptitle(title or "target images: predictions and their entropy (bright = uncertain)", fontsize=10)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.12)
    class_legend(fig, sorted(present))
    plt.close(fig)
    return fig


def adversarial_history_figure(runs: Mapping[str, Any], smooth: int = 10) -> Figure:
    """Per run (one colour each): left, the discriminators' loss L_D; middle, the main discriminator's mean
    output on source (solid) and target (dashed) predictions; right, the segmenter's adversarial term on
    the main level. Running means over `smooth` log points."""
    from .training import _smooth

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
    colours = plt.get_cmap("tab10")
    for i, (label, run) in enumerate(runs.items()):
        s = history_series(run.history if hasattr(run, "history") else run)
        c = colours(i % 10)
        for ax, key, style, name in ((axes[0], "d_loss_main", "-", label),
                                     (axes[1], "d_source_main", "-", f"{label}: on source"),
                                     (axes[1], "d_target_main", "--", f"{label}: on target"),
                                     (axes[2], "adv_main", "-", label)):
            if key in s:
                x, y = s[key]
                ax.plot(x, _smooth(y, smooth), style, color=c, lw=1.4, label=name)
    titles = ("main discriminator's loss L_D (bce: ln 2 = 0.69 when it cannot tell)",
              "main D's mean output (bce: P(target); 0 = source)", "segmenter's adversarial term (main level)")
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=8)
        ax.set_xlabel("iteration")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def disagreement_figure(images_by_domain: Mapping[str, torch.Tensor], maps_by_domain: Mapping[str, torch.Tensor],
                        per_domain: int = 3, title: str | None = None) -> Figure:
    """Rows = domains; per image, the image and its disagreement map log(1 + 10 KL(P_a ‖ P_p)), one colour
    scale for all (the mean KL of the image in the title)."""
    names = list(images_by_domain)
    vmax = max(float(torch.log1p(10 * maps_by_domain[d][:per_domain]).max()) for d in names) or 1.0
    fig, axes = plt.subplots(len(names), 2 * per_domain, figsize=(2.2 * 2 * per_domain, 1.5 * len(names) + 0.6),
                             squeeze=False)
    im = None
    for r, d in enumerate(names):
        for j in range(per_domain):
            ax_i, ax_m = axes[r, 2 * j], axes[r, 2 * j + 1]
            ax_i.imshow(to_numpy_image(images_by_domain[d][j]))
            kl = maps_by_domain[d][j]
            im = ax_m.imshow(torch.log1p(10 * kl).numpy(), cmap="viridis", vmin=0, vmax=vmax)
            ax_m.set_title(f"mean KL {float(kl.mean()):.3f}", fontsize=7)
            for ax in (ax_i, ax_m):
                ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax_i.set_ylabel(d, fontsize=9)
    fig.suptitle(title or "primary vs auxiliary classifier: per-pixel disagreement log(1 + 10 KL(P_a ‖ P_p))",
                 fontsize=10)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01)
    plt.close(fig)
    return fig


def disagreement_error_figure(curves: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                              bins: int = 10) -> Figure:
    """For each (label: (disagreement, prediction, label) over pixels), the error rate of the prediction per
    decile of disagreement (left), and the share of all errors found by flagging the most disagreeing
    pixels (right; the diagonal is what a random flag finds)."""
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, (kl, pred, lab) in curves.items():
        kl, pred, lab = kl.reshape(-1).float(), pred.reshape(-1), lab.reshape(-1)
        valid = lab != IGNORE_INDEX
        kl, wrong = kl[valid], (pred[valid] != lab[valid]).float()
        order = torch.argsort(kl, descending=True)
        chunks = torch.tensor_split(order.flip(0), bins)  # low to high disagreement
        rates = [float(wrong[c].mean()) for c in chunks]
        ax_b.plot(np.arange(1, bins + 1), rates, "o-", label=f"{label} (error {float(wrong.mean()):.2f})")
        found = torch.cumsum(wrong[order], 0) / wrong.sum().clamp_min(1)
        frac = torch.arange(1, len(order) + 1) / len(order)
        step = max(1, len(order) // 400)
        ax_c.plot(frac[::step].numpy(), found[::step].numpy(), label=label)
    ax_b.set_xlabel("decile of disagreement KL(P_a ‖ P_p) (1 = lowest)")
    ax_b.set_ylabel("error rate of the primary head")
    ax_c.plot([0, 1], [0, 1], ":", color="grey", label="random flag")
    ax_c.set_xlabel("fraction of pixels flagged (most disagreeing first)")
    ax_c.set_ylabel("fraction of all errors found")
    for ax in (ax_b, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("is disagreement between the heads a good uncertainty?", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def pseudo_label_figure(manifest: Mapping[str, Any], title: str | None = None) -> Figure:
    """Per class predicted on the target: its share of the pixels, the fraction kept by the rule, and the
    accuracy of the kept labels (when `score_pseudo_labels` has added it)."""
    share = manifest["predicted_share"]
    classes = sorted(share, key=lambda c: -share[c])
    acc = (manifest.get("accuracy") or {}).get("per_class", {})
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(classes) + 2), 3.4))
    ax.bar(x - 0.2, [manifest["kept_fraction"].get(c, 0) for c in classes], 0.4, label="kept fraction")
    if acc:
        ax.bar(x + 0.2, [acc.get(c, 0) for c in classes], 0.4, label="accuracy of kept labels")
    ax.plot(x, [share[c] for c in classes], "k.", label="share of target pixels predicted as the class")
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    overall = (manifest.get("accuracy") or {}).get("overall")
    ax.set_title(title or f"pseudo labels ({manifest['rule']['rule']} rule): kept {manifest['kept_overall']:.0%}"
                 + (f", accuracy {overall:.0%}" if overall is not None else ""), fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def uda_results(runs: Mapping[str, Any], source: str, target: str, title: str | None = None) -> tuple[Any, Figure]:
    """Runs of one UDA pair, label -> `Run`: a DataFrame (one row per run: mIoU on the source's val split,
    on every target, training seconds) and grouped bars of mIoU per domain, each domain labelled with its
    role and the adapted `target` marked "adapted" (adaptation aims at one domain and may move the others)."""
    import pandas as pd

    from ..data.city import DOMAINS

    table = pd.DataFrame([{"method": label, f"{source} (source, val)": r.metrics["source_val_miou"],
                           **r.metrics["target_miou"], "train s": r.metrics["train_seconds"]}
                          for label, r in runs.items()]).set_index("method")
    per_domain = {label: {source: r.metrics["source_val_miou"], **r.metrics["target_miou"]} for label, r in runs.items()}
    domains = next(iter(per_domain.values()))
    roles = {d: "source" if d == source else (DOMAINS[d].role if d in DOMAINS else "target")
             + (", adapted" if d == target else "") for d in domains}
    return table, domain_bars(per_domain, roles, title=title or f"mIoU per domain, adapting {source} -> {target}")


def uda_explorer(method: Any, images: torch.Tensor, labels: torch.Tensor, aux_fusion: float = 0.5) -> Any:
    """Pick a target image: image, ground truth, the primary and auxiliary heads' predictions, their
    disagreement log(1 + 10 KL(P_a ‖ P_p)) and the fused prediction argmax(P_p + a P_a)."""
    import ipywidgets as widgets

    from ..methods.mrnet import disagreement_map
    from ..methods.pseudo_labels import fuse_heads
    from .explorers import _explorer, _present

    main, aux = head_outputs(method, images)
    kl = disagreement_map(main, aux)
    controls = {"image": widgets.IntSlider(0, 0, len(images) - 1, description="target image"),
                "fusion": widgets.FloatSlider(aux_fusion, min=0.0, max=2.0, step=0.25, description="a in P_p + a P_a")}

    def draw() -> Figure:
        i, a = controls["image"].value, controls["fusion"].value
        lab = labels[i].numpy()
        fused = fuse_heads(main[i : i + 1], aux[i : i + 1], a).argmax(1)[0].numpy()
        preds = {"primary": main[i].argmax(0).numpy(), "auxiliary": aux[i].argmax(0).numpy(), "fused": fused}
        acc = {k: float((v == lab)[lab != IGNORE_INDEX].mean()) for k, v in preds.items()}
        fig, axes = plt.subplots(2, 3, figsize=(11, 4.4))
        pics = [(to_numpy_image(images[i]), "image", None), (colorize(lab), "ground truth", None),
                (torch.log1p(10 * kl[i]).numpy(), f"disagreement (mean KL {float(kl[i].mean()):.3f})", "viridis"),
                (colorize(preds["primary"]), f"primary head (acc {acc['primary']:.2f})", None),
                (colorize(preds["auxiliary"]), f"auxiliary head (acc {acc['auxiliary']:.2f})", None),
                (colorize(fused), f"fused, a = {a:g} (acc {acc['fused']:.2f})", None)]
        for ax, (pic, head, cmap) in zip(axes.ravel(), pics):
            ax.imshow(pic, cmap=cmap)
            ax.set_title(head, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.subplots_adjust(bottom=0.12)
        class_legend(fig, _present(lab, *preds.values()))
        return fig

    return _explorer(controls, [["image", "fusion"]], draw)


def class_names(indices: Sequence[int]) -> list[str]:
    return [CLASSES[i] for i in indices]
