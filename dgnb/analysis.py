"""Measurements the notebooks plot: style statistics, predictions, mIoU against a knob's severity."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .data.taxonomy import NUM_CLASSES
from .engine.evaluate import SegMetrics, confusion_matrix
from .models import Segmenter


@torch.no_grad()
def channel_statistics(model: Segmenter, images: torch.Tensor, stage: str = "stem") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image channel mean μ and std σ of the `stage` features, each (B, C): what IN removes
    (`dgnb.models.style.channel_stats`)."""
    from .models.style import channel_stats

    model.eval()
    stages, _ = model.encode(images.to(next(model.parameters()).device))
    mu, sigma = channel_stats(stages[stage])
    return mu.cpu(), sigma.cpu()


def style_statistics(model: Segmenter, images_by_domain: Mapping[str, torch.Tensor], stage: str = "stem"):
    """DataFrame, one row per image: domain, mean (of μ), std (of σ), pc1, pc2 (PCA of [μ, σ])."""
    import pandas as pd
    from sklearn.decomposition import PCA

    rows, vectors = [], []
    for domain, images in images_by_domain.items():
        mu, sigma = channel_statistics(model, images, stage)
        vectors.append(torch.cat([mu, sigma], 1).numpy())
        rows += [{"domain": domain, "mean": m.mean().item(), "std": s.mean().item()} for m, s in zip(mu, sigma)]
    pcs = PCA(n_components=2).fit_transform(np.concatenate(vectors))
    df = pd.DataFrame(rows)
    df["pc1"], df["pc2"] = pcs[:, 0], pcs[:, 1]
    return df


def image_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """List of (H,W,3) uint8 arrays -> (B,3,H,W) float in [0,1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def predict_labels(method, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Arg-max label maps (B,H,W) of a method (anything with `.predict(images) -> scores`)."""
    method.eval()
    device = next(method.parameters()).device
    out = [method.predict(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def miou_of(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return SegMetrics(confusion_matrix(pred, labels, NUM_CLASSES)).miou


def severity_sweep(method, domain: str, knob: str, severities: Sequence[int] = range(6), n: int = 24,
                   size: tuple[int, int] = (128, 256), split: str = "val", seed: int = 0) -> dict[int, float]:
    """mIoU of `method` on `n` renders of `domain` with `knob` set to each severity (same layouts)."""
    from .data.city import DOMAINS, render

    out = {}
    for s in severities:
        dom = DOMAINS[domain].with_knobs(**{knob: s})
        renders = [render(dom, split, i, seed=seed, size=size) for i in range(n)]
        images = image_tensor([r.image for r in renders])
        labels = torch.from_numpy(np.stack([r.label for r in renders]).astype(np.int64))
        out[int(s)] = round(miou_of(predict_labels(method, images), labels), 2)
    return out


def severity_curves(methods: Mapping[str, Any], domain: str, knobs: Sequence[str], severities: Sequence[int] = range(6),
                    n: int = 24, size: tuple[int, int] = (128, 256), split: str = "val", seed: int = 0
                    ) -> dict[str, dict[str, dict[int, float]]]:
    """`severity_sweep` for several methods at once, each severity rendered once and shared by the methods:
    {knob: {method label: {severity: mIoU}}}."""
    from .data.city import DOMAINS, render

    out: dict[str, dict[str, dict[int, float]]] = {}
    for knob in knobs:
        out[knob] = {label: {} for label in methods}
        for s in severities:
            dom = DOMAINS[domain].with_knobs(**{knob: s})
            renders = [render(dom, split, i, seed=seed, size=size) for i in range(n)]
            images = image_tensor([r.image for r in renders])
            labels = torch.from_numpy(np.stack([r.label for r in renders]).astype(np.int64))
            for label, method in methods.items():
                out[knob][label][int(s)] = round(miou_of(predict_labels(method, images), labels), 2)
    return out


# ----- comparing methods: paired differences over seeds ------------------------------------------
def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value t_{(1+confidence)/2, dof}."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, dof))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference a − b over seeds (a[i] and b[i] from the same seed) with its t-interval.

    d_i = a_i − b_i, mean d̄, s = std(d, ddof=1), half-width h = t_{(1+c)/2, n−1} · s / √n (Student t over
    the n seeds: the seeds are the samples, the evaluation set is fixed). The interval is d̄ ± h; the
    difference is *resolved* when it excludes zero. Pairing removes what two runs of the same seed share
    (initialisation, data order), so it needs fewer seeds than comparing two independent means.
    Returns {mean, half_width, low, high, sd, n, confidence, excludes_zero}; n < 2 gives an infinite interval.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference needs two equally long 1-D sequences, got shapes {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "sd": sd, "n": n,
            "confidence": confidence, "excludes_zero": bool(n > 1 and (mean - half > 0 or mean + half < 0))}


def detectable_difference(sd: float, n: int, confidence: float = 0.95) -> float:
    """The smallest paired mean difference whose interval excludes zero at n seeds: t · sd / √n."""
    return t_quantile(confidence, n - 1) * sd / math.sqrt(n)


def format_difference(diff: Mapping[str, Any], digits: int = 1) -> str:
    """'+1.8 [−0.3, +3.9]', with ' ✓' when the interval excludes zero (the difference is resolved)."""
    if diff["n"] < 2:
        return f"{diff['mean']:+.{digits}f} (1 seed)"
    mark = " ✓" if diff["excludes_zero"] else ""
    return f"{diff['mean']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]{mark}"


def compare_runs(runs: Sequence[Mapping[str, Any]], reference: str, confidence: float = 0.95
                 ) -> dict[str, dict[str, Any]]:
    """For every method other than `reference`: paired differences (method − reference) on each target, the
    mean target and the source val, over the seeds both have. `runs` are `dgnb bench` records
    (method, seed, target_miou, mean_target_miou, source_val_miou)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    if reference not in methods:
        raise ValueError(f"reference method '{reference}' has no runs; methods: {methods}")
    return {m: contrast(runs, m, reference, confidence) for m in methods if m != reference}


def contrast(runs: Sequence[Mapping[str, Any]], method: str, reference: str, confidence: float = 0.95
             ) -> dict[str, Any]:
    """Paired differences `method` − `reference` on each target, the mean target and the source val (None
    when a record has no source val, e.g. an earlier stage of a multi-stage run), over the seeds both have."""
    by = {(r["method"], r["seed"]): r for r in runs}
    for m in (method, reference):
        if not any(mm == m for mm, _ in by):
            raise ValueError(f"method '{m}' has no runs; methods: {list(dict.fromkeys(mm for mm, _ in by))}")
    seeds = sorted(s for (mm, s) in by if mm == method and (reference, s) in by)
    pairs = [(by[(method, s)], by[(reference, s)]) for s in seeds]

    def diff(get) -> dict[str, Any]:
        return paired_difference([get(x) for x, _ in pairs], [get(y) for _, y in pairs], confidence)

    targets = [t for t in pairs[0][0]["target_miou"] if t in pairs[0][1]["target_miou"]] if pairs else []
    has_source = all(x.get("source_val_miou") is not None and y.get("source_val_miou") is not None for x, y in pairs)
    return {"reference": reference, "seeds": seeds,
            "mean_target": diff(lambda r: r["mean_target_miou"]),
            "source_val": diff(lambda r: r["source_val_miou"]) if has_source else None,
            "targets": {t: diff(lambda r, t=t: r["target_miou"][t]) for t in targets}}


def stage_records(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`dgnb bench` records for the earlier stages of a multi-stage run (its metrics' `stage_results`): method
    `"<method>@stage<k>"` for the weights that ended stage k (e.g. `mrnet@stage1`: MRNet after Stage I), with
    the same seed and targets as the run; no source val (stages are scored on the targets only)."""
    return [{"method": f"{run['method']}@stage{st['stage'] + 1}", "seed": run["seed"], "stage_of": run["method"],
             "iteration": st["iteration"], "target_miou": st["target_miou"],
             "mean_target_miou": st["mean_target_miou"], "source_val_miou": None, "train_seconds": None}
            for st in run.get("stage_results") or []]


# ----- style and content of the backbone stages (PFR) ---------------------------------------------
@torch.no_grad()
def stage_features(model: Segmenter, images: torch.Tensor, stages: Sequence[str] = ("layer1", "layer2", "layer3",
                   "layer4"), batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The backbone's feature maps at `stages`, {stage: (B, C, h, w)} on CPU, in eval mode (the model's mode is
    restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    for i in range(0, len(images), batch_size):
        feats, _ = model.encode(images[i : i + batch_size].to(device))
        for s in stages:
            out[s].append(feats[s].float().cpu())
    model.train(was_training)
    return {s: torch.cat(v) for s, v in out.items()}


def refinement_distances(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                         gram_norm: str = "cn", match: str = "resize") -> dict[str, dict[str, float]]:
    """Per stage, PFR's two distances between source image k and target image k (`stage_features` of each),
    averaged over the pairs: {stage: {style, content, style_rel, content_rel}}.

    style = ‖S_s − S_t‖ (Eq. 2's term) and content = ‖C_s − C_t‖ (Eq. 3's, sizes matched by `match`), and the
    same divided by ½(‖·_s‖ + ‖·_t‖): relative distances in [0, 2] that do not fall when a network merely
    shrinks its features (comparable across models)."""
    from .methods.pfr import gram_matrix, match_sizes, pair_distance, pair_up

    def both(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        d = pair_distance(a, b, "l2")
        size = 0.5 * (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1))
        return float(d.mean()), float((d / size.clamp_min(1e-12)).mean())

    out = {}
    for stage in source:
        s, t = pair_up(source[stage], target[stage])
        style, style_rel = both(gram_matrix(s, gram_norm), gram_matrix(t, gram_norm))
        content, content_rel = both(*match_sizes(s, t, match))
        out[stage] = {"style": style, "content": content, "style_rel": style_rel, "content_rel": content_rel}
    return out


def shipped_bench(name: str, methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The records of a `dgnb bench --out` file the repository ships in `benchmarks/results/` (runs, then the
    rows of earlier stages such as `cbst@stage2`), optionally only those of `methods`: the notebooks read their
    five-seed comparisons from these instead of training every seed in the lab."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shipped benchmark files live in the repository's "
                                "benchmarks/results (install dgnb from a clone with `make setup`, or rerun the "
                                "bench command the README gives for it)")
    data = json.loads(path.read_text())
    records = data["runs"] + data.get("stages", [])
    return [r for r in records if methods is None or r["method"] in methods]


def bench_records(runs: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """`dgnb bench`-style records ({method, seed, target_miou, mean_target_miou, source_val_miou, ...}) of runs
    grouped by label, {label: [Run over seeds]}, with the label as the method: variants of one method (PFR
    with and without its adversarial term) stay apart in `compare_runs` and `seed_intervals_figure`."""
    return [{**run.metrics, "method": label} for label, rs in runs.items() for run in rs]


# ----- what a categorical memory's read carries (Pin the Memory) ----------------------------------
@torch.no_grad()
def memory_read_diagnostics(method, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16
                            ) -> dict[str, float]:
    """How much class information the memory read W (Eq. 4) carries, on labelled images:

    - `own_slot_weight`: mean over labelled pixels of W[y(p)](p), the weight a pixel gives its own class's
      slot (a uniform read gives 1/N);
    - `uniform_weight`: 1/N, for comparison;
    - `read_only_miou`: mIoU of argmax_n W[n](p) used as the label (no decoder);
    - `slot_similarity`: mean cosine between distinct slots M[n]ᵀM[n'] (0: orthogonal, 1: all equal);
    - `channels_per_class`: C / N.
    """
    from torch.nn import functional as F

    memory = method.memory.float()
    n_slots = memory.shape[0]
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    own_sum, own_count = 0.0, 0
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], labels[i : i + batch_size]
        w = method.read_weights(x.to(method.device)).float().cpu()
        w = F.interpolate(w, size=y.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(w.argmax(1), y, NUM_CLASSES)
        valid = y != 255
        own = w.gather(1, y.clamp(max=n_slots - 1).unsqueeze(1))[:, 0]
        own_sum += float(own[valid].sum())
        own_count += int(valid.sum())
    sim = memory @ memory.t()
    off = (sim.sum() - sim.diagonal().sum()) / (n_slots * (n_slots - 1))
    return {"own_slot_weight": own_sum / max(own_count, 1), "uniform_weight": 1.0 / n_slots,
            "read_only_miou": SegMetrics(cm).miou, "slot_similarity": float(off),
            "channels_per_class": memory.shape[1] / n_slots}
