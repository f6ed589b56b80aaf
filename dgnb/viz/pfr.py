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
                title: str | None = None, shared_scale: bool = False) -> Figure:
    """`grams[model] = (source Grams, target Grams)`, each {stage: (C, C)} of one image. Rows per model:
    S of the source image, S of the target image, S_s − S_t; one column per stage.

    The S panels of a model and stage share one colour scale, square-root stretched (0 to the largest
    entry, given in their titles: a few channels dominate otherwise); the difference panel is symmetric
    around 0 and clipped at the 99th percentile of |S_s − S_t|, with ‖S_s − S_t‖ and its relative size
    ‖S_s − S_t‖ / ½(‖S_s‖ + ‖S_t‖) in its title. `shared_scale=True` uses one scale per stage for all
    models (a model whose features are smaller then looks faded)."""
    from matplotlib.colors import PowerNorm

    models = list(grams)
    stages = list(next(iter(grams.values()))[0])

    def top(g: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], st: str) -> float:
        return max(float(g[0][st].abs().max()), float(g[1][st].abs().max()), 1e-12)

    def clip(g: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], st: str) -> float:
        return max(float(torch.quantile((g[0][st] - g[1][st]).abs().flatten().float(), 0.99)), 1e-12)

    shared = {st: (max(top(g, st) for g in grams.values()), max(clip(g, st) for g in grams.values()))
              for st in stages}
    rows = 3 * len(models)
    fig, axes = plt.subplots(rows, len(stages), figsize=(2.1 * len(stages) + 0.6, 1.85 * rows), squeeze=False)
    for m, model in enumerate(models):
        src, tgt = grams[model]
        for c, st in enumerate(stages):
            vmax, dmax = shared[st] if shared_scale else (top(grams[model], st), clip(grams[model], st))
            diff = src[st] - tgt[st]
            norm = float(diff.norm())
            rel = norm / max(0.5 * float(src[st].norm() + tgt[st].norm()), 1e-12)
            heads = [f"{st} ({src[st].shape[0]} ch), max {float(src[st].abs().max()):.2g}",
                     f"max {float(tgt[st].abs().max()):.2g}", f"‖ΔS‖ {norm:.2g} (relative {rel:.2f})"]
            panels = [(src[st], "viridis", PowerNorm(0.5, 0.0, vmax)), (tgt[st], "viridis", PowerNorm(0.5, 0.0, vmax)),
                      (diff, "RdBu_r", None)]
            for k, (pic, cmap, cnorm) in enumerate(panels):
                ax = axes[3 * m + k, c]
                extra = {"norm": cnorm} if cnorm is not None else {"vmin": -dmax, "vmax": dmax}
                ax.imshow(pic.numpy(), cmap=cmap, interpolation="nearest", **extra)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(heads[k], fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{model}\n" + ("S, source", "S, target", "S_s − S_t")[k], fontsize=8)
    fig.suptitle(title or "Gram matrices S = F Fᵀ / (C N) of one source and one target image, per stage", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def stage_distances_figure(distances: Mapping[str, Mapping[str, Mapping[str, float]]],
                           measures: Sequence[str] = ("style", "content"), log: bool = True,
                           title: str | None = None) -> Figure:
    """One panel per measure; in each, grouped bars per stage, one bar per entry of `distances`
    ({label: {stage: {measure: value}}}, as `dgnb.analysis.refinement_distances` returns per label).
    `log`: a log scale for the absolute measures (their stages differ by orders of magnitude); the
    relative ones (`*_rel`, in [0, 2]) stay linear."""
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
        if log and not measure.endswith("_rel"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
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
