"""Figures for episodic meta-learning (MLDG, notebook 02). Every function returns a matplotlib Figure.

- `episode_figure`: which images of a domain-major batch land in meta-train and meta-test, over a
  few random draws of `dgnb.methods.meta.split_episode`.
- `meta_gradient_figure`: a two-parameter problem drawn in the parameter plane: the meta-train and
  meta-test losses, the inner step θ → θ', the MLDG objective and its first- and second-order
  update directions.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .figures import to_numpy_image

TRAIN_COLOUR, TEST_COLOUR = "#2166ac", "#e66101"


def episode_figure(batch: Mapping[str, torch.Tensor], episodes: Sequence[tuple[Mapping, Mapping]],
                   domain_names: Sequence[str], cell: float = 1.5) -> Figure:
    """One row per episode (meta-train batch, meta-test batch), one column per image of `batch`
    (domain-major); a blue frame marks meta-train images, an orange one meta-test images."""
    images, domains = batch["image"], batch["domain"].tolist()
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(len(episodes), len(domains), figsize=(cell * len(domains) * w / h / 1.3,
                                                                     cell * len(episodes) / 1.1 + 0.8), squeeze=False)
    for r, (tr, te) in enumerate(episodes):
        train_domains = set(tr["domain"].tolist())
        for c, d in enumerate(domains):
            ax = axes[r, c]
            ax.imshow(to_numpy_image(images[c]))
            ax.set_xticks([]), ax.set_yticks([])
            colour = TRAIN_COLOUR if d in train_domains else TEST_COLOUR
            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=5, edgecolor=colour))
            if r == 0:
                ax.set_title(domain_names[d], fontsize=8)
        names_tr = ", ".join(domain_names[d] for d in sorted(train_domains))
        names_te = ", ".join(domain_names[d] for d in sorted(set(te["domain"].tolist())))
        axes[r, 0].set_ylabel(f"draw {r + 1}", fontsize=8)
        axes[r, -1].yaxis.set_label_position("right")
        axes[r, -1].set_ylabel(f"tr: {names_tr}\nte: {names_te}", fontsize=7, rotation=0, ha="left", va="center")
    fig.legend(handles=[Patch(facecolor="white", edgecolor=TRAIN_COLOUR, lw=3, label="meta-train"),
                        Patch(facecolor="white", edgecolor=TEST_COLOUR, lw=3, label="meta-test")],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    plt.close(fig)
    return fig


def _grid_values(f: Callable[[torch.Tensor], torch.Tensor], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.array([[float(f(torch.tensor([x, y], dtype=torch.float64))) for x in xs] for y in ys])


def meta_gradient_figure(loss_tr: Callable[[torch.Tensor], torch.Tensor],
                         loss_te: Callable[[torch.Tensor], torch.Tensor], theta: Sequence[float], alpha: float,
                         beta: float = 1.0, extent: tuple[float, float, float, float] | None = None,
                         resolution: int = 41, parameter_names: Sequence[str] = ("w₁", "w₂")) -> Figure:
    """A two-parameter MLDG step in the parameter plane.

    Left: contours of L_tr (blue) and L_te (orange), θ, and the inner step θ' = θ − α∇L_tr(θ).
    Right: contours of the MLDG objective J(θ) = L_tr(θ) + β L_te(θ − α∇L_tr(θ)) with the descent
    directions at θ: first order −(∇L_tr(θ) + β∇L_te(θ')) and second order −∇J(θ) =
    −(∇L_tr(θ) + β(I − α∇²L_tr(θ))∇L_te(θ')), the exact gradient of J. `loss_tr` and `loss_te` take a
    float64 tensor of shape (2,).
    """
    def grad(f, w):
        w = w.detach().clone().requires_grad_(True)
        return torch.autograd.grad(f(w), w)[0]

    def objective(w):
        with torch.enable_grad():
            w = w if w.requires_grad else w.detach().requires_grad_(True)
            g = torch.autograd.grad(loss_tr(w), w, create_graph=True)[0]
            return loss_tr(w) + beta * loss_te(w - alpha * g)

    t = torch.tensor(list(theta), dtype=torch.float64)
    g_tr = grad(loss_tr, t)
    t_prime = t - alpha * g_tr
    g_te = grad(loss_te, t_prime)
    first = g_tr + beta * g_te
    second = grad(objective, t)
    if extent is None:
        pts = torch.stack([t, t_prime])
        lo, hi = pts.min(0).values.numpy(), pts.max(0).values.numpy()
        span = np.maximum(hi - lo, 1.0)
        extent = (lo[0] - span[0], hi[0] + span[0], lo[1] - span[1], hi[1] + span[1])
    xs, ys = np.linspace(extent[0], extent[1], resolution), np.linspace(extent[2], extent[3], resolution)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4))
    ax = axes[0]
    ax.contour(xs, ys, _grid_values(loss_tr, xs, ys), levels=12, colors=TRAIN_COLOUR, linewidths=0.8)
    ax.contour(xs, ys, _grid_values(loss_te, xs, ys), levels=12, colors=TEST_COLOUR, linewidths=0.8)
    ax.annotate("", xy=t_prime.numpy(), xytext=t.numpy(), arrowprops={"arrowstyle": "->", "color": "black", "lw": 1.5})
    ax.plot(*t.numpy(), "ko")
    ax.plot(*t_prime.numpy(), "o", color="grey")
    ax.text(*t.numpy(), "  θ", fontsize=11)
    ax.text(*t_prime.numpy(), "  θ'", fontsize=11)
    ax.legend(handles=[Patch(color=TRAIN_COLOUR, label="L_tr (meta-train)"), Patch(color=TEST_COLOUR, label="L_te (meta-test)")],
              fontsize=8, loc="upper right")
    ax.set_title("the inner step θ' = θ − α∇L_tr(θ)", fontsize=9)
    ax = axes[1]
    values = np.array([[float(objective(torch.tensor([x, y], dtype=torch.float64)).detach()) for x in xs] for y in ys])
    ax.contour(xs, ys, values, levels=15, colors="0.55", linewidths=0.8)
    scale = 0.35 * min(extent[1] - extent[0], extent[3] - extent[2]) / max(float(first.norm()), float(second.norm()), 1e-12)
    for vec, colour, name in ((first, "#1b7837", "first order"), (second, "#762a83", "second order = −∇J")):
        ax.annotate("", xy=(t - scale * vec).numpy(), xytext=t.numpy(),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 2})
        ax.plot([], [], color=colour, lw=2, label=name)
    ax.plot(*t.numpy(), "ko")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"MLDG objective J(θ) = L_tr(θ) + β L_te(θ'), α = {alpha}, β = {beta}", fontsize=9)
    for ax in axes:
        ax.set_xlabel(parameter_names[0])
        ax.set_ylabel(parameter_names[1])
        ax.set_aspect("equal", adjustable="box")
    fig.tight_layout()
    plt.close(fig)
    return fig


def gradient_parts_figure(parts: Mapping[str, Mapping[str, torch.Tensor]], depth: int = 2,
                          title: str | None = None) -> Figure:
    """The parts of an update direction, per group of parameters (the first `depth` components of the
    parameter names): the norm of each part (bars) and, for the first two parts, their cosine
    similarity (points, right axis): > 0 where the two parts agree, < 0 where they pull apart.

    `parts` = {label: {parameter name: gradient}}, e.g. {"∇L_tr(θ)": ..., "β∇L_te(θ')": ...}."""
    labels = list(parts)
    names = list(parts[labels[0]])
    groups = list(dict.fromkeys(".".join(n.split(".")[:depth]) for n in names))

    def flat(label: str, group: str) -> torch.Tensor:
        return torch.cat([parts[label][n].detach().flatten().double() for n in names
                          if ".".join(n.split(".")[:depth]) == group])

    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(1.0 * len(groups) + 3, 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        norms = [float(flat(label, g).norm()) for g in groups]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, norms, width, label=f"‖{label}‖")
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3, axis="y")
    if len(labels) >= 2:
        cos = [float(torch.nn.functional.cosine_similarity(flat(labels[0], g), flat(labels[1], g), dim=0))
               for g in groups]
        ax2 = ax.twinx()
        ax2.plot(x, cos, "kD", ms=6, label=f"cos({labels[0]}, {labels[1]})")
        ax2.axhline(0, color="black", lw=0.6, ls=":")
        ax2.set_ylim(-1.05, 1.05)
        ax2.set_ylabel("cosine similarity")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    else:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
