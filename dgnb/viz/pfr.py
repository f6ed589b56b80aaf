"""Figures for PFR (notebook 07): style (Gram matrices) and content of the backbone stages.

- `gram_figure`: per model, the Gram matrices S of one source image and one target image at every stage,
  and their difference (the quantity Eq. 2 shrinks).
- `stage_distances_figure`: grouped bars, per stage, of style and content distances (any measures of
  `dgnb.analysis.refinement_distances`) for several models or kinds of image pairs.
- `refinement_history_figure`: the per-stage style and content distances the training logged (`Run.history`).
Every function returns a matplotlib Figure.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .training import _smooth, history_series

STAGES = ("layer1", "layer2", "layer3", "layer4")
MEASURES = {"style": "style ‖S_s − S_t‖", "content": "content ‖C_s − C_t‖",
            "style_rel": "relative style distance", "content_rel": "relative content distance"}


def gram_figure(grams: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                title: str | None = None) -> Figure:
    """`grams[model] = (source Grams, target Grams)`, each {stage: (C, C)} of one image. Rows per model:
    S of the source image, S of the target image, S_s − S_t; one column per stage.

    In a column, the S panels of every model share one colour scale (0 to the largest entry), and the
    difference panels a symmetric one, so models compare at a glance; each difference panel gives
    ‖S_s − S_t‖ and its relative size ‖S_s − S_t‖ / ½(‖S_s‖ + ‖S_t‖)."""
    models = list(grams)
    stages = list(next(iter(grams.values()))[0])
    vmax = {st: max(float(torch.maximum(g[0][st].abs().max(), g[1][st].abs().max())) for g in grams.values())
            for st in stages}
    dmax = {st: max(float((g[0][st] - g[1][st]).abs().max()) for g in grams.values()) or 1.0 for st in stages}
    rows = 3 * len(models)
    fig, axes = plt.subplots(rows, len(stages), figsize=(2.1 * len(stages) + 0.6, 1.85 * rows), squeeze=False)
    for m, model in enumerate(models):
        src, tgt = grams[model]
        for c, st in enumerate(stages):
            diff = src[st] - tgt[st]
            norm = float(diff.norm())
            rel = norm / max(0.5 * float(src[st].norm() + tgt[st].norm()), 1e-12)
            panels = [(src[st], "viridis", 0.0, vmax[st], f"{st} ({src[st].shape[0]} ch)"),
                      (tgt[st], "viridis", 0.0, vmax[st], None),
                      (diff, "RdBu_r", -dmax[st], dmax[st], f"‖ΔS‖ {norm:.3g} (rel {rel:.2f})")]
            for k, (pic, cmap, lo, hi, head) in enumerate(panels):
                ax = axes[3 * m + k, c]
                ax.imshow(pic.numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if head:
                    ax.set_title(head, fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{model}\n" + ("S, source", "S, target", "S_s − S_t")[k], fontsize=8)
    fig.suptitle(title or "Gram matrices S = F Fᵀ / (C N) of one source and one target image, per stage", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def stage_distances_figure(distances: Mapping[str, Mapping[str, Mapping[str, float]]],
                           measures: Sequence[str] = ("style", "content"), log: bool = False,
                           title: str | None = None) -> Figure:
    """One panel per measure; in each, grouped bars per stage, one bar per entry of `distances`
    ({label: {stage: {measure: value}}}, as `dgnb.analysis.refinement_distances` returns per label)."""
    labels = list(distances)
    stages = list(next(iter(distances.values())))
    fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures) + 0.4, 3.2), squeeze=False)
    width = 0.8 / len(labels)
    colours = plt.get_cmap("tab10")
    x = np.arange(len(stages))
    for ax, measure in zip(axes[0], measures):
        for i, label in enumerate(labels):
            values = [distances[label][st][measure] for st in stages]
            bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=colours(i % 10), label=label)
            if len(labels) <= 3:  # more bars per group leave no room for their values
                ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.set_xticks(x, stages, fontsize=8)
        ax.set_title(MEASURES.get(measure, measure), fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def refinement_history_figure(runs: Mapping[str, Any], smooth: int = 10, stages: Sequence[str] = STAGES) -> Figure:
    """Left: the style distance of each stage (`sty_<stage>` in the history), right: the content distance
    (`con_<stage>`), over training; one colour per stage, one line style per run. Log scale (the stages
    differ by orders of magnitude); running means over `smooth` log points."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    colours = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    for r, (label, run) in enumerate(runs.items()):
        s = history_series(run.history if hasattr(run, "history") else run)
        for ax, prefix in zip(axes, ("sty", "con")):
            for k, st in enumerate(stages):
                key = f"{prefix}_{st}"
                if key in s:
                    x, y = s[key]
                    ax.plot(x, _smooth(y, smooth), styles[r % 4], color=colours(k / max(1, len(stages) - 1)), lw=1.4,
                            label=f"{label}: {st}")
    for ax, what in zip(axes, ("style term ‖S_s − S_t‖ per stage (Eq. 2)", "content term ‖C_s − C_t‖ per stage (Eq. 3)")):
        ax.set_title(what + (f", running mean over {smooth} logs" if smooth > 1 else ""), fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    plt.close(fig)
    return fig
