"""Pseudo labels for a target set (self-training: MRNet Stage II, CBST and DRSL rounds).

A trained model predicts every image of the unlabelled target train split; the pseudo label of a pixel is
the argmax of (optionally fused) class probabilities, kept or set to ignore (255) by a rule:

    none            keep every pixel (MRNet's IJCAI version: "we do not introduce any threshold")
    confidence      keep a pixel when its top probability is at least `threshold`
    class_balanced  per class c, θ_c = the confidence above which the `portion` most confident pixels
                    predicted as c lie; keep a pixel predicted c when its confidence ≥ θ_c
                    (CBST's class-wise quantile, Zou et al. 2018, Eq. 9 with one portion for all classes)

The labels are written in the common layout, `<root>/<name>/train/{images,labels}/<id>.png` (the images
are links to, or copies of, the target's), with a `meta.json` manifest: the rule and its thresholds, the
share of each class, and per class the kept fraction of the pixels predicted as it. Their accuracy
against the target's true labels is not computed while training (a UDA run never reads those labels);
`score_pseudo_labels` adds it to the manifest afterwards, for analysis, when the benchmark has them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES
from ..io import atomic_save_png, atomic_write_json

RULES = ("none", "confidence", "class_balanced")


def fuse_heads(main_logits: torch.Tensor, aux_logits: torch.Tensor, aux_weight: float = 0.5,
               space: str = "probabilities") -> torch.Tensor:
    """Class probabilities of the two heads fused: MRNet's F_p + a F_a (`space="probabilities"`, the paper's
    argmax(F_p + 0.5 F_a), renormalised to sum to 1) or softmax(z_p + a z_a) (`space="logits"`, the code)."""
    if space == "probabilities":
        return (main_logits.float().softmax(1) + aux_weight * aux_logits.float().softmax(1)) / (1 + aux_weight)
    if space == "logits":
        return (main_logits.float() + aux_weight * aux_logits.float()).softmax(1)
    raise ValueError(f"unknown fusion space '{space}'; choose probabilities or logits")


def class_balanced_thresholds(confidence: torch.Tensor, prediction: torch.Tensor, portion: float,
                              num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """θ (num_classes,): for each class c, the confidence of the ⌈portion · n_c⌉-th most confident of the n_c
    pixels predicted as c (+inf for a class never predicted), so that keeping `confidence ≥ θ_c` keeps that
    portion of them (more only with ties)."""
    if not 0 < portion <= 1:
        raise ValueError(f"portion={portion} must lie in (0, 1]")
    conf, pred = confidence.reshape(-1).float(), prediction.reshape(-1)
    thresholds = torch.full((num_classes,), math.inf)
    for c in range(num_classes):
        values = conf[pred == c]
        if len(values):
            k = max(1, math.ceil(portion * len(values)))
            thresholds[c] = torch.topk(values, k).values[-1]
    return thresholds


def apply_rule(confidence: torch.Tensor, prediction: torch.Tensor, rule: str = "none", threshold: float = 0.9,
               thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo labels: `prediction` where the rule keeps the pixel, IGNORE_INDEX elsewhere."""
    if rule == "none":
        keep = torch.ones_like(prediction, dtype=torch.bool)
    elif rule == "confidence":
        keep = confidence >= threshold
    elif rule == "class_balanced":
        if thresholds is None:
            raise ValueError("the class_balanced rule needs thresholds (class_balanced_thresholds)")
        keep = confidence >= thresholds.to(confidence.device)[prediction]
    else:
        raise ValueError(f"unknown pseudo-label rule '{rule}'; choose one of {RULES}")
    return torch.where(keep, prediction, torch.full_like(prediction, IGNORE_INDEX))


@dataclass
class PseudoLabels:
    """A written pseudo-label set: `SegFolder(root, name, "train")` reads it."""

    root: Path
    name: str

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.folder / "meta.json").read_text())


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_pseudo_labels(probabilities: Callable[[torch.Tensor], torch.Tensor],
                       batches: Iterable[tuple[list[str], torch.Tensor]], image_paths: Callable[[list[str]], list[Path]],
                       root: Path, name: str, rule: str = "none", threshold: float = 0.9, portion: float = 0.5,
                       info: dict[str, Any] | None = None) -> PseudoLabels:
    """Predict every target image (`batches` of (ids, images)), apply `rule`, write the set and its manifest.

    `probabilities(images)` returns (B, C, H, W) class probabilities (e.g. `fuse_heads` of a model's heads);
    `image_paths(ids)` the target image files, linked (or copied) next to the labels. The `none` and
    `confidence` rules write each batch as it comes; `class_balanced` keeps the confidences (half
    precision) and predictions (one byte) of the whole set first, so its thresholds are computed over the
    whole set, as CBST does."""
    if rule not in RULES:
        raise ValueError(f"unknown pseudo-label rule '{rule}'; choose one of {RULES}")
    folder = Path(root) / name
    ids: list[str] = []
    kept = torch.zeros(NUM_CLASSES, dtype=torch.long)
    predicted = torch.zeros(NUM_CLASSES, dtype=torch.long)
    held: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def write(image_id: str, conf: torch.Tensor, pred: torch.Tensor, thresholds: torch.Tensor | None) -> None:
        nonlocal kept
        label = apply_rule(conf.float(), pred.long(), rule, threshold, thresholds)
        kept += torch.bincount(label[label != IGNORE_INDEX].reshape(-1), minlength=NUM_CLASSES)[:NUM_CLASSES]
        atomic_save_png(folder / "train" / "labels" / f"{image_id}.png", label.to(torch.uint8).numpy(), fsync=False)
        src = image_paths([image_id])[0]
        _link_or_copy(Path(src), folder / "train" / "images" / f"{image_id}{Path(src).suffix}")

    for batch_ids, images in batches:
        with torch.no_grad():
            conf, pred = probabilities(images).max(1)
        conf, pred = conf.cpu(), pred.to(torch.uint8).cpu()
        ids += batch_ids
        predicted += torch.bincount(pred.reshape(-1).long(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        for image_id, c, p in zip(batch_ids, conf, pred):
            if rule == "class_balanced":
                held.append((image_id, c.half(), p))
            else:
                write(image_id, c, p, None)
    thresholds = None
    if rule == "class_balanced":
        thresholds = class_balanced_thresholds(torch.cat([c.reshape(-1).float() for _, c, _ in held]),
                                               torch.cat([p.reshape(-1).long() for _, _, p in held]), portion)
        for image_id, c, p in held:
            write(image_id, c, p, thresholds)
    total = int(predicted.sum())
    manifest = {
        "name": name, "origin": "pseudo labels", "role": "pseudo", **(info or {}),
        "rule": {"rule": rule, "threshold": threshold if rule == "confidence" else None,
                 "portion": portion if rule == "class_balanced" else None},
        "thresholds": ({CLASSES[c]: (None if math.isinf(float(t)) else round(float(t), 4))
                        for c, t in enumerate(thresholds)} if thresholds is not None else None),
        "kept_overall": round(float(kept.sum()) / max(total, 1), 4),
        "kept_fraction": {CLASSES[c]: round(float(kept[c]) / float(predicted[c]), 4)
                          for c in range(NUM_CLASSES) if predicted[c] > 0},
        "predicted_share": {CLASSES[c]: round(float(predicted[c]) / max(total, 1), 5)
                            for c in range(NUM_CLASSES) if predicted[c] > 0},
        "accuracy": None,
        "splits": {"train": len(ids)},
    }
    atomic_write_json(folder / "meta.json", manifest)
    return PseudoLabels(Path(root), name)


def score_pseudo_labels(pseudo: PseudoLabels, labels_root: str | Path, labels_dataset: str) -> dict[str, Any]:
    """Accuracy of the kept pseudo labels against the true labels of `labels_dataset`'s train split, per class
    (precision: of the pixels pseudo-labelled c, the fraction truly c) and overall; also the recall of the
    kept labels. Written into the manifest. Analysis only: it reads the target's labels, which no training
    run does."""
    from ..data.folder import load_label

    hits = torch.zeros(NUM_CLASSES, dtype=torch.long)
    labelled = torch.zeros(NUM_CLASSES, dtype=torch.long)
    truth_total = torch.zeros(NUM_CLASSES, dtype=torch.long)
    for path in sorted((pseudo.folder / "train" / "labels").glob("*.png")):
        truth_path = Path(labels_root) / labels_dataset / "train" / "labels" / path.name
        pl = torch.from_numpy(load_label(path).astype(np.int64))
        gt = torch.from_numpy(load_label(truth_path).astype(np.int64))
        valid = gt != IGNORE_INDEX
        kept = (pl != IGNORE_INDEX) & valid
        labelled += torch.bincount(pl[kept], minlength=NUM_CLASSES)[:NUM_CLASSES]
        hits += torch.bincount(pl[kept & (pl == gt)], minlength=NUM_CLASSES)[:NUM_CLASSES]
        truth_total += torch.bincount(gt[valid], minlength=NUM_CLASSES)[:NUM_CLASSES]
    accuracy = {
        "overall": round(float(hits.sum()) / max(float(labelled.sum()), 1.0), 4),
        "per_class": {CLASSES[c]: round(float(hits[c]) / float(labelled[c]), 4)
                      for c in range(NUM_CLASSES) if labelled[c] > 0},
        "recall_per_class": {CLASSES[c]: round(float(hits[c]) / float(truth_total[c]), 4)
                             for c in range(NUM_CLASSES) if truth_total[c] > 0},
        "against": f"{labels_dataset}/train labels",
    }
    manifest = pseudo.manifest
    manifest["accuracy"] = accuracy
    atomic_write_json(pseudo.folder / "meta.json", manifest)
    return accuracy
