"""Seeing training and comparing methods over seeds. Every function returns a matplotlib Figure.

- `plot_history`: the losses and the validation mIoU logged while a run trained (`Run.history`).
- `target_points_figure`: per target, each method's mean over seeds with its t-interval (error bars)
  and the seeds as small dots; optionally a second panel of paired differences to a baseline.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..analysis import paired_difference

History = Sequence[Mapping[str, Any]]
NOT_LOSSES = ("iteration",)


def _history(run: Any) -> list[Mapping[str, Any]]:
    """A run's history: a `Run` (its `history`), or already a list of log records."""
    return list(run.history if hasattr(run, "history") else run)


def _label(run: Any, i: int) -> str:
    cfg = getattr(run, "config", None)
    return f"{cfg.method} s{cfg.seed}" if cfg is not None else f"run {i}"


def history_series(history: History) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (iterations, values)} for every numeric key logged (losses every `log_every`, `val_*` at
    evaluation points)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for rec in history:
        for k, v in rec.items():
            if k in NOT_LOSSES or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out.setdefault(k, ([], []))
            out[k][0].append(rec["iteration"])
            out[k][1].append(float(v))
    return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in out.items()}


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)  # running mean over the first points
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_history(runs: Any, terms: Sequence[str] | None = None, smooth: int = 1,
                 title: str | None = None) -> Figure:
    """Training curves of one run or several: losses over iterations (left) and the validation mIoU
    of the source domains measured at each evaluation point (right).

    `runs`: a `Run`, a list of log records, or a mapping label -> run (or a list of runs). With one
    run every logged loss term is drawn (`terms` picks some); with several, each run's `terms`
    (default: the total `loss`) in one colour per run. `smooth` > 1 draws a running mean over that
    many log points (the raw curve stays, faint).
    """
    if isinstance(runs, Mapping):
        items = list(runs.items())
    elif hasattr(runs, "history") or (isinstance(runs, Sequence) and runs and isinstance(runs[0], Mapping)):
        items = [(_label(runs, 0) if hasattr(runs, "config") else "run", runs)]
    else:
        items = [(_label(r, i), r) for i, r in enumerate(runs)]
    series = {label: history_series(_history(run)) for label, run in items}
    single = len(series) == 1
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.5, 1]})
    colours = plt.get_cmap("tab10")
    for i, (label, s) in enumerate(series.items()):
        loss_keys = [k for k in s if not k.startswith("val_")]
        if "loss" in s:  # a term equal to the total (ERM without auxiliary head: seg = loss) is drawn once
            loss_keys = [k for k in loss_keys if k == "loss" or not np.array_equal(s[k][1], s["loss"][1])]
        keys = list(terms) if terms is not None else (loss_keys if single else ["loss"])
        for j, key in enumerate(k for k in keys if k in s):
            x, y = s[key]
            colour = colours(j % 10) if single else colours(i % 10)
            name = key if single else (label if len(keys) == 1 else f"{label}: {key}")
            style = "-" if single or j == 0 else ["--", ":", "-."][(j - 1) % 3]
            if smooth > 1:
                ax_loss.plot(x, y, color=colour, alpha=0.25, lw=0.8)
                y = _smooth(y, smooth)
            ax_loss.plot(x, y, style, color=colour, lw=1.4, label=name)
        for key in (k for k in s if k.startswith("val_")):
            x, y = s[key]
            ax_val.plot(x, y, "o-", color=colours(i % 10), label=label if not single else key)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training losses" + (f" (running mean over {smooth} logs)" if smooth > 1 else ""), fontsize=9)
    ax_val.set_xlabel("iteration")
    ax_val.set_ylabel("mIoU (%)")
    ax_val.set_title("source validation mIoU at each evaluation", fontsize=9)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if ax is ax_loss else 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)  # displayed once, as the returned value (not also by the inline backend)
    return fig


def target_points_figure(results: Mapping[str, Mapping[str, Sequence[float]]], baseline: str | None = None,
                         confidence: float = 0.95, ylabel: str = "mIoU (%)", title: str | None = None) -> Figure:
    """Per target (x axis), one point per method: the mean over seeds with its Student-t `confidence`
    interval as an error bar (none with a single seed), each seed a small dot behind it.

    `results[method][target]` = values over seeds (the same seeds, in the same order, for every
    method). With `baseline`, a second panel shows each other method minus the baseline, paired by
    seed (`dgnb.analysis.paired_difference`): an interval that excludes 0 (filled marker) is a
    difference the seeds support; one that crosses 0 (open marker) is not.
    """
    methods = list(results)
    targets = list(dict.fromkeys(t for m in methods for t in results[m]))
    others = [m for m in methods if m != baseline] if baseline else []
    ncols = 2 if others else 1
    fig, axes = plt.subplots(1, ncols, figsize=(1.3 * len(targets) * ncols + 3, 3.6), squeeze=False)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    width = 0.7 / max(1, len(methods))
    x = np.arange(len(targets))
    ax = axes[0, 0]
    for i, m in enumerate(methods):
        off = (i - (len(methods) - 1) / 2) * width
        for j, t in enumerate(targets):
            vals = np.asarray(results[m].get(t, []), dtype=float)
            if not len(vals):
                continue
            iv = paired_difference(vals, np.zeros(len(vals)), confidence)  # the mean and its t-interval
            ax.scatter(np.full(len(vals), x[j] + off), vals, s=10, color=colours[m], alpha=0.35, linewidths=0)
            err = iv["half_width"] if np.isfinite(iv["half_width"]) else None  # none with one seed
            ax.errorbar(x[j] + off, iv["mean"], yerr=err, fmt="o", color=colours[m], capsize=3, ms=6,
                        label=f"{m} (n = {iv['n']})" if j == 0 else None)
    ax.set_xticks(x, targets, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"mean over seeds, {int(confidence * 100)}% t-interval", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    if others:
        ax = axes[0, 1]
        w = 0.7 / len(others)
        for i, m in enumerate(others):
            off = (i - (len(others) - 1) / 2) * w
            for j, t in enumerate(targets):
                if t not in results[m] or t not in results[baseline]:
                    continue
                d = paired_difference(results[m][t], results[baseline][t], confidence)
                err = d["half_width"] if np.isfinite(d["half_width"]) else None
                face = colours[m] if d["excludes_zero"] else "white"
                ax.errorbar(x[j] + off, d["mean"], yerr=err, fmt="o", color=colours[m], mfc=face, capsize=3, ms=6,
                            label=f"{m} − {baseline}" if j == 0 else None)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, targets, fontsize=8)
        ax.set_ylabel(f"difference in {ylabel}")
        ax.set_title("paired by seed (filled: the interval excludes 0)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def results_over_seeds(runs: Mapping[str, Sequence[Any]], key: str = "target_miou") -> dict[str, dict[str, list[float]]]:
    """{method: {domain: [value per run]}} from {method: [runs over seeds]}, reading `metrics[key]`; a run may
    also be a `dgnb bench` record (a dict, e.g. from `dgnb.analysis.shipped_bench`)."""
    out: dict[str, dict[str, list[float]]] = {}
    for method, rs in runs.items():
        for run in rs:
            for domain, value in (run if isinstance(run, dict) else run.metrics)[key].items():
                out.setdefault(method, {}).setdefault(domain, []).append(float(value))
    return out
