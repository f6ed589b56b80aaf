"""Self-training machinery of CBST and DRSL (docs/self_training.md): class-balanced pseudo labels of a round,
rare-class patch mining, and the round's training set (pseudo-labelled target images mixed with a source portion).

One CBST round (Zou et al., ECCV 2018, as the CRST code `crst_seg.py` runs it):

1. predict every image of the unlabelled target train split (softmax, optionally averaged with the
   prediction of the flipped image);
2. per class c, θ_c = the confidence above which the `portion` most confident of the pixels predicted as c
   lie (`portion_thresholds`; the code takes every `stride`-th pixel to bound memory);
3. pseudo labels (`label_pixels`): form `weighted` (the paper's closed-form solution and the code's
   `label_selection`): ŷ = argmax_c p_c / θ_c, kept where max_c p_c / θ_c ≥ 1, else ignore (255);
   form `quantile`: ŷ = argmax_c p_c, kept where p_ŷ ≥ θ_ŷ (`pseudo_labels.apply_rule`);
4. mine classes (`mine_classes`): the classes predicted on less than `mine_portion` of the target pixels;
   with probability `mine_chance`, an image whose pseudo labels hold one of them is cropped around a random
   pixel of a random one (`mining_window`, the code's `GTA5StMineDataSet`);
5. the round trains on the target images with their pseudo labels mixed with labelled source images drawn at
   random (`write_training_set`): a `source_portion` of the source dataset (the code's parametrization,
   `basis="dataset"`), or as many as make `source_portion` of the round's set (`basis="share"`).
   The code's 3% of GTA5 (24,966 images) next to Cityscapes' 2,975 train images is a 20% share of the set;
   3% of the city's 600 source images next to 600 target images would be 3%.

Everything is written in the common layout: `write_round` writes the full pseudo-label set with its
manifest (the same fields as `pseudo_labels.make_pseudo_labels`, so `score_pseudo_labels` scores it), and
`write_training_set` the round's training set next to it (links to the files, mined patches as new files).
Both are pure functions of the model and a seed, so a resumed run writes them again identically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES
from ..io import atomic_save_png, atomic_write_json
from .pseudo_labels import PseudoLabels, _link_or_copy, apply_rule

FORMS = ("weighted", "quantile")
SOURCE_BASES = ("share", "dataset")


# ----- thresholds and labels (pure tensor functions) --------------------------------------------------------
def portion_thresholds(confidence: torch.Tensor, prediction: torch.Tensor, portion: float,
                       num_classes: int = NUM_CLASSES, stride: int = 1) -> torch.Tensor:
    """θ (num_classes,): per class c, the confidence of the ⌈portion · n_c⌉-th most confident of the n_c pixels
    predicted as c (+inf for a class never predicted), over every `stride`-th pixel (CRST's `ds_rate`; 1 = all).

    Keeping `confidence ≥ θ_c` keeps that portion of class c's pixels (more only with ties). One sort over
    (class, −confidence) for all classes at once."""
    if not 0 < portion <= 1:
        raise ValueError(f"portion={portion} must lie in (0, 1]")
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1")
    conf = confidence.reshape(-1)[::stride].double()
    pred = prediction.reshape(-1)[::stride].long()
    key = pred.double() * 2.0 + (1.0 - conf.clamp(0, 1))  # class-major, most confident first
    order = torch.argsort(key)
    counts = torch.bincount(pred, minlength=num_classes)[:num_classes]
    starts = torch.cumsum(counts, 0) - counts
    take = torch.ceil(portion * counts.double()).long().clamp_min(1)
    index = (starts + take - 1).clamp(max=max(len(order) - 1, 0))
    thresholds = torch.full((num_classes,), math.inf, dtype=torch.float64)
    seen = counts > 0
    if seen.any():
        thresholds[seen] = conf[order][index[seen]]
    return thresholds.float()


def label_pixels(probs: torch.Tensor, thresholds: torch.Tensor, form: str = "weighted") -> torch.Tensor:
    """Pseudo labels (B, H, W) of class probabilities (B, K, H, W) under class thresholds θ (K,).

    weighted: ŷ = argmax_c p_c / θ_c where max_c p_c / θ_c ≥ 1, else 255 (CBST's solution of its
              self-training objective; CRST `label_selection`). A rare class with a low θ can win a pixel
              another class predicts.
    quantile: ŷ = argmax_c p_c where p_ŷ ≥ θ_ŷ, else 255 (`pseudo_labels.apply_rule`, class_balanced).
    A class with θ = +inf is never given."""
    probs = probs.float()
    theta = thresholds.to(probs.device).float().view(1, -1, 1, 1)
    if form == "weighted":
        ratio, label = (probs / theta).max(1)
        return torch.where(ratio >= 1.0, label, torch.full_like(label, IGNORE_INDEX))
    if form == "quantile":
        conf, pred = probs.max(1)
        return apply_rule(conf, pred, "class_balanced", thresholds=thresholds.to(probs.device))
    raise ValueError(f"unknown pseudo-label form '{form}'; choose one of {FORMS}")


def mine_classes(predicted: torch.Tensor, mine_portion: float) -> list[int]:
    """Classes whose share of the predicted target pixels is positive and below `mine_portion` (CRST `mine_id`,
    `mine_port` = 1e-3), rarest first."""
    share = predicted.double() / max(float(predicted.sum()), 1.0)
    rare = ((share > 0) & (share < mine_portion)).nonzero().flatten()
    return rare[torch.argsort(share[rare], stable=True)].tolist()


def rarest_classes(predicted: torch.Tensor, count: int) -> list[int]:
    """The `count` predicted classes with the smallest share (CRST `rare_id`, `rare_cls_num` = 3)."""
    seen = (predicted > 0).nonzero().flatten()
    return seen[torch.argsort(predicted[seen], stable=True)][:count].tolist()


def mining_window(label: torch.Tensor, classes: Sequence[int], crop: tuple[int, int],
                  generator: torch.Generator) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of a `crop`-sized window centred on a random pixel of a random class of
    `classes` present in `label` (H, W), shifted to stay inside the image (CRST's mining crop); None when
    none of the classes is present."""
    if not len(classes):
        return None
    wanted = torch.as_tensor(list(classes), dtype=label.dtype)
    present = torch.unique(label[torch.isin(label, wanted)])
    if not len(present):
        return None
    c = present[torch.randint(len(present), (1,), generator=generator)]
    rows, cols = (label == c).nonzero(as_tuple=True)
    k = int(torch.randint(len(rows), (1,), generator=generator))
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    top = min(max(int(rows[k]) - ch // 2, 0), h - ch)
    left = min(max(int(cols[k]) - cw // 2, 0), w - cw)
    return top, left, ch, cw


# ----- a round's pseudo labels on disk ----------------------------------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    return [value] if torch.is_tensor(value) else [v for v in value if torch.is_tensor(v)]


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    return type(value)(v.detach().cpu() if torch.is_tensor(v) else v for v in value)


@torch.no_grad()
def write_round(predict: Callable[[torch.Tensor], Any],
                batches: Callable[[], Iterable[tuple[list[str], torch.Tensor]]],
                image_paths: Callable[[list[str]], list[Path]], root: Path, name: str, portion: float,
                form: str = "weighted", stride: int = 1, mine_portion: float = 1e-3, rare_count: int = 3,
                info: dict[str, Any] | None = None,
                finish: Callable[[Any, tuple[int, int]], torch.Tensor] | None = None,
                cache_bytes: int = 1 << 30) -> PseudoLabels:
    """One round's pseudo labels of the whole target train split, written as `<root>/<name>/train/...` with a
    `meta.json` manifest.

    `predict(images)` returns the class probabilities (B, K, H, W), or, with `finish`, anything
    `finish(output, (H, W))` turns into them (e.g. a classifier's low-resolution scores, which are small). The
    split is read twice (`batches()` yields (ids, images)): once for the thresholds, which need every image,
    once to label and write. The second pass reuses the first pass's outputs while they fit in `cache_bytes`
    (the low-resolution scores of the city's 600 images take a few MB), and predicts again otherwise; it
    never keeps the full-resolution probabilities of a whole set, only the confidence (float32: a
    half-precision 1.0 would swallow the top of a confident class) and the predicted class of every
    `stride`-th pixel.

    Manifest: as `pseudo_labels.make_pseudo_labels` (rule, thresholds, kept_overall, kept_fraction per class of
    the pixels *predicted* as it, predicted_share, accuracy = None until `score_pseudo_labels`), plus the
    form, the portion, `labelled_share` (each class's share of the kept labels: the weighted form can move a
    pixel to another class), the mine classes and the rarest classes."""
    if form not in FORMS:
        raise ValueError(f"unknown pseudo-label form '{form}'; choose one of {FORMS}")
    finish = finish or (lambda output, size: output)
    cache: list[Any] | None = []
    cached = 0
    confs, preds = [], []
    predicted = torch.zeros(NUM_CLASSES, dtype=torch.long)
    for _, images in batches():
        output = predict(images)
        if cache is not None:
            cached += sum(t.numel() * t.element_size() for t in _tensors(output))
            if cached <= cache_bytes:
                cache.append(_to_cpu(output))
            else:
                cache = None  # too large to keep: the second pass predicts again
        conf, pred = finish(output, tuple(images.shape[-2:])).float().max(1)
        predicted += torch.bincount(pred.reshape(-1).cpu(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        confs.append(conf.reshape(-1)[::stride].cpu())
        preds.append(pred.reshape(-1)[::stride].cpu().to(torch.uint8))
    thresholds = portion_thresholds(torch.cat(confs), torch.cat(preds).long(), portion)
    del confs, preds
    folder = Path(root) / name
    kept_as_predicted = torch.zeros(NUM_CLASSES, dtype=torch.long)
    labelled = torch.zeros(NUM_CLASSES, dtype=torch.long)
    ids: list[str] = []
    for k, (batch_ids, images) in enumerate(batches()):
        output = cache[k] if cache is not None else predict(images)
        probs = finish(output, tuple(images.shape[-2:])).float()
        labels = label_pixels(probs, thresholds, form).cpu()
        pred = probs.argmax(1).cpu()
        kept = labels != IGNORE_INDEX
        kept_as_predicted += torch.bincount(pred[kept], minlength=NUM_CLASSES)[:NUM_CLASSES]
        labelled += torch.bincount(labels[kept], minlength=NUM_CLASSES)[:NUM_CLASSES]
        for image_id, label in zip(batch_ids, labels):
            atomic_save_png(folder / "train" / "labels" / f"{image_id}.png", label.to(torch.uint8).numpy(), fsync=False)
            src = Path(image_paths([image_id])[0])
            _link_or_copy(src, folder / "train" / "images" / f"{image_id}{src.suffix}")
        ids += batch_ids
    total = max(int(predicted.sum()), 1)
    kept_total = max(int(labelled.sum()), 1)
    manifest = {
        "name": name, "origin": "pseudo labels", "role": "pseudo", **(info or {}),
        "rule": {"rule": "class_balanced", "form": form, "threshold": None, "portion": portion, "stride": stride},
        "thresholds": {CLASSES[c]: (None if math.isinf(float(t)) else round(float(t), 4))
                       for c, t in enumerate(thresholds)},
        "kept_overall": round(float(labelled.sum()) / total, 4),
        "kept_fraction": {CLASSES[c]: round(float(kept_as_predicted[c]) / float(predicted[c]), 4)
                          for c in range(NUM_CLASSES) if predicted[c] > 0},
        "predicted_share": {CLASSES[c]: round(float(predicted[c]) / total, 5)
                            for c in range(NUM_CLASSES) if predicted[c] > 0},
        "labelled_share": {CLASSES[c]: round(float(labelled[c]) / kept_total, 5)
                           for c in range(NUM_CLASSES) if labelled[c] > 0},
        "mine_classes": [CLASSES[c] for c in mine_classes(predicted, mine_portion)],
        "mine_portion": mine_portion,
        "rare_classes": [CLASSES[c] for c in rarest_classes(predicted, rare_count)],
        "accuracy": None,
        "splits": {"train": len(ids)},
    }
    atomic_write_json(folder / "meta.json", manifest)
    return PseudoLabels(Path(root), name)


def source_count(portion: float, basis: str, pool: int, targets: int) -> int:
    """How many source images a round mixes in: ⌊portion · pool⌋ (`dataset`: a portion of the source dataset,
    CRST's `src_portion`) or round(portion / (1 − portion) · targets), at most `pool` (`share`: the source
    images make `portion` of the round's set)."""
    if basis == "dataset":
        return int(math.floor(portion * pool))
    if basis == "share":
        if not 0 <= portion < 1:
            raise ValueError(f"a source share must lie in [0, 1), got {portion}")
        return min(pool, int(round(portion / (1.0 - portion) * targets)))
    raise ValueError(f"unknown source basis '{basis}'; choose one of {SOURCE_BASES}")


def write_training_set(pseudo: PseudoLabels, name: str, crop: tuple[int, int], mine_chance: float,
                       sources: Sequence[Any], source_portion: float, generator: torch.Generator,
                       basis: str = "dataset") -> dict[str, Any]:
    """The round's training set `<pseudo.root>/<name>/train`, read by the loader as the target stream:

    - every target image of `pseudo` with its pseudo label (`t-<id>`, links); with probability `mine_chance`,
      when its labels hold a mine class of the manifest, the `crop`-sized window of `mining_window` instead
      (written as a smaller image; with the presets' scales the loader's random scale and crop keep its centre);
    - `source_count(source_portion, basis, N_s, N_t)` source images drawn at random without replacement from
      the N_s images of `sources` (SegFolders with labels), with their labels (`s-<dataset>-<id>`, links):
      CRST's source mix.
    Returns the composition (also in the set's `meta.json`)."""
    from ..data.folder import load_image, load_label

    manifest = pseudo.manifest
    mined_ids = [CLASSES.index(c) for c in manifest["mine_classes"]]
    out = pseudo.root / name / "train"
    images = sorted((pseudo.folder / "train" / "images").iterdir())
    mined = 0
    for image in images:
        label_path = pseudo.folder / "train" / "labels" / f"{image.stem}.png"
        draw = float(torch.rand((), generator=generator))
        window = None
        if draw < mine_chance:
            label = torch.from_numpy(load_label(label_path).astype(np.int64))
            window = mining_window(label, mined_ids, crop, generator)
        if window is None:
            _link_or_copy(image, out / "images" / f"t-{image.name}")
            _link_or_copy(label_path, out / "labels" / f"t-{image.stem}.png")
            continue
        top, left, h, w = window
        pixels = load_image(image)[top : top + h, left : left + w]
        atomic_save_png(out / "images" / f"t-{image.stem}.png", np.ascontiguousarray(pixels), fsync=False)
        atomic_save_png(out / "labels" / f"t-{image.stem}.png",
                        np.ascontiguousarray(load_label(label_path)[top : top + h, left : left + w]), fsync=False)
        mined += 1
    pool = [(ds.dataset, s) for ds in sources for s in ds.samples]
    n_source = source_count(source_portion, basis, len(pool), len(images))
    chosen = torch.randperm(len(pool), generator=generator)[:n_source].tolist() if n_source else []
    for i in sorted(chosen):
        dataset, sample = pool[i]
        _link_or_copy(sample.image, out / "images" / f"s-{dataset}-{sample.image.name}")
        _link_or_copy(sample.label, out / "labels" / f"s-{dataset}-{sample.image.stem}.png")
    composition = {"target_images": len(images), "mined_patches": mined, "source_images": n_source,
                   "mine_classes": manifest["mine_classes"], "mine_chance": mine_chance,
                   "source_portion": source_portion, "source_basis": basis, "source_pool": len(pool)}
    atomic_write_json(pseudo.root / name / "meta.json", {
        "name": name, "origin": "pseudo labels", "role": "pseudo",
        "description": f"training set of a self-training round: {pseudo.name} (mined patches included) mixed "
                       f"with {n_source} labelled source images",
        "pseudo_labels": pseudo.name, **composition, "splits": {"train": len(images) + n_source}})
    return composition
