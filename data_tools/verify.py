"""`python -m data_tools verify DATA_ROOT/<dataset>`: check a converted dataset and report every problem.

Checks: meta.json present and complete; every image has a label and the reverse; each split's
manifest agrees with the files (ids, byte sizes, counts, image sizes, class pixel counts) and with
meta.json; every image decodes; every label is single-channel uint8 holding only 0..18 and 255, with
the size of its image.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dgnb.data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES

from .common import IMAGE_SUFFIXES, file_size, run_pool

REQUIRED_META = ("name", "role", "description", "protocol", "source", "splits")
SHOW = 5  # problems of one kind shown before "... and N more"


@dataclass
class VerifyReport:
    """What `verify` found: summary lines and problems (empty when the dataset is sound)."""

    path: Path
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add_many(self, what: str, items: list[str]) -> None:
        """One problem line per item (first few), then a count."""
        for item in items[:SHOW]:
            self.problems.append(f"{what}: {item}")
        if len(items) > SHOW:
            self.problems.append(f"{what}: ... and {len(items) - SHOW} more")

    def text(self) -> str:
        out = [f"verify {self.path}", *[f"  {line}" for line in self.lines]]
        if self.ok:
            out.append("OK: no problems found")
        else:
            out.append(f"PROBLEMS ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        return "\n".join(out)


def _noop() -> None:
    return None


def check_pair(task: tuple[str, str, str, bool]) -> dict[str, Any]:
    """Decode one image/label pair; returns sizes, label pixel counts and any problem (never raises)."""
    sid, image, label, quick = task
    out: dict[str, Any] = {"id": sid, "problems": []}
    try:
        with Image.open(image) as im:
            if not quick:
                im.load()
            out["size"] = list(im.size)
    except (OSError, SyntaxError, ValueError) as e:
        out["problems"].append(f"image {image} does not decode ({e}); reconvert (delete it, rerun convert)")
    try:
        with Image.open(label) as im:
            if im.mode not in ("L", "P"):
                out["problems"].append(f"label {label} has mode {im.mode}, expected single-channel L")
                return out
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        out["problems"].append(f"label {label} does not decode ({e}); reconvert (delete it, rerun convert)")
        return out
    counts = np.bincount(arr.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES:IGNORE_INDEX]) + NUM_CLASSES
    if bad.size:
        out["problems"].append(f"label {label} holds values {bad[:10].tolist()} outside 0..18 and 255")
    if "size" in out and out["size"] != [arr.shape[1], arr.shape[0]]:
        out["problems"].append(f"size mismatch: image {image} is {out['size'][0]}x{out['size'][1]}, label "
                               f"{label} is {arr.shape[1]}x{arr.shape[0]}")
    out["pixels"] = [*counts[:NUM_CLASSES].tolist(), int(counts[IGNORE_INDEX])]
    return out


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in suffixes and not p.name.startswith(".")}


def _check_manifest(rep: VerifyReport, split: str, manifest: dict[str, Any], pairs: dict[str, tuple[Path, Path]],
                    meta_count: int | None) -> None:
    if not manifest.get("complete", False):
        rep.problems.append(f"{split}: manifest records {len(manifest.get('errors', []))} failed file(s): the "
                            "conversion did not finish cleanly; fix them and rerun convert")
    count = manifest.get("count")
    if count != len(pairs):
        rep.problems.append(f"{split}: manifest counts {count} pairs, the folders hold {len(pairs)}")
    if meta_count is not None and meta_count != count:
        rep.problems.append(f"{split}: meta.json counts {meta_count} pairs, the manifest {count}")
    items = manifest.get("items", {})
    rep.add_many(f"{split}: on disk but not in the manifest", sorted(set(pairs) - set(items)))
    rep.add_many(f"{split}: in the manifest but not on disk", sorted(set(items) - set(pairs)))
    wrong = []
    for sid, item in items.items():
        if sid in pairs:
            sizes = [file_size(pairs[sid][0]), file_size(pairs[sid][1])]
            if sizes != item["bytes"] or pairs[sid][0].name != item["image"]:
                wrong.append(f"{sid} ({pairs[sid][0].name}, {pairs[sid][1].name}: {sizes} bytes, manifest "
                             f"{item['image']} {item['bytes']})")
    rep.add_many(f"{split}: file differs from the manifest (truncated or modified)", wrong)


def _verify_split(rep: VerifyReport, split_dir: Path, meta_count: int | None, workers: int, quick: bool,
                  progress: bool) -> np.ndarray:
    split = split_dir.name
    images = _files(split_dir / "images", IMAGE_SUFFIXES)
    labels = _files(split_dir / "labels", (".png",))
    rep.add_many(f"{split}: image without label", [str(images[k]) for k in sorted(set(images) - set(labels))])
    rep.add_many(f"{split}: label without image", [str(labels[k]) for k in sorted(set(labels) - set(images))])
    pairs = {k: (images[k], labels[k]) for k in sorted(set(images) & set(labels))}
    if not pairs:
        rep.problems.append(f"{split}: no image/label pairs in {split_dir}")
    manifest_path = split_dir / "manifest.json"
    manifest: dict[str, Any] = {}
    if not manifest_path.is_file():
        rep.problems.append(f"{split}: {manifest_path} is missing; rerun convert for this split")
    else:
        try:
            manifest = json.loads(manifest_path.read_text())
            _check_manifest(rep, split, manifest, pairs, meta_count)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            rep.problems.append(f"{split}: {manifest_path} is unreadable ({e!r}); rerun convert for this split")
            manifest = {}
    tasks = [(k, str(i), str(lab), quick) for k, (i, lab) in pairs.items()]
    pixels = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    sizes: Counter[str] = Counter()
    found: list[str] = []
    for res in run_pool(check_pair, tasks, workers, _noop, (), f"verify {split}", progress):
        found += res["problems"]
        if "pixels" in res:
            pixels += res["pixels"]
        if "size" in res:
            sizes["{}x{}".format(*res["size"])] += 1
    rep.add_many(f"{split}", found)
    if manifest and not found:
        if pixels[:NUM_CLASSES].tolist() != manifest.get("class_pixels") or int(pixels[-1]) != manifest.get(
                "ignore_pixels"):
            rep.problems.append(f"{split}: class pixel counts of the labels differ from the manifest (labels were "
                                "modified after conversion); reconvert this split")
        if dict(sizes) != manifest.get("image_sizes"):
            rep.problems.append(f"{split}: image sizes {dict(sizes)} differ from the manifest "
                                f"{manifest.get('image_sizes')}")
    top = ", ".join(f"{s} ({n})" for s, n in sizes.most_common(3))
    extra = []
    for key in ("orphans", "excluded", "degenerate"):
        if manifest.get(key):
            extra.append(f"{len(manifest[key])} {key}")
    expected = manifest.get("expected_count")
    rep.lines.append(f"{split}: {len(pairs)} pairs" + (f" (expected: {expected})" if expected else "")
                     + f"; sizes {top or '-'}" + (f"; manifest lists {', '.join(extra)}" if extra else ""))
    return pixels


def verify(path: str | Path, workers: int = 1, progress: bool = True, quick: bool = False) -> VerifyReport:
    """Check the converted dataset folder `path` (<root>/<dataset>); `quick` skips decoding image pixels."""
    path = Path(path)
    rep = VerifyReport(path)
    if not path.is_dir():
        rep.problems.append(f"{path} is not a folder; pass DATA_ROOT/<dataset>")
        return rep
    meta: dict[str, Any] = {}
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        rep.problems.append(f"{meta_path} is missing: the conversion did not finish (meta.json is written last); "
                            "rerun the convert command, it resumes")
    else:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            rep.problems.append(f"{meta_path} is not valid JSON ({e}); rerun convert")
        missing = [k for k in REQUIRED_META if k not in meta]
        if meta and missing:
            rep.problems.append(f"{meta_path} lacks keys {missing}")
        if meta:
            rep.lines.append(f"source {meta.get('source')}, role {meta.get('role')}, protocol {meta.get('protocol')}, "
                             f"layout {meta.get('layout')}, mapping: {meta.get('mapping')}")
    meta_splits: dict[str, int] = meta.get("splits", {}) if isinstance(meta.get("splits"), dict) else {}
    on_disk = {p.name for p in path.iterdir() if p.is_dir() and ((p / "images").is_dir() or (p / "labels").is_dir())}
    for split in sorted(set(meta_splits) - on_disk):
        rep.problems.append(f"meta.json lists split '{split}' but {path / split} holds no images/labels")
    for split in sorted(on_disk - set(meta_splits)) if meta else []:
        rep.problems.append(f"split folder {path / split} is not listed in meta.json")
    total = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    for split in sorted(on_disk):
        total += _verify_split(rep, path / split, meta_splits.get(split), workers, quick, progress)
    labelled = max(int(total[:NUM_CLASSES].sum()), 1)
    share = ", ".join(f"{CLASSES[c]} {100 * total[c] / labelled:.1f}%" for c in np.argsort(-total[:NUM_CLASSES])
                      if total[c] > 0)
    rep.lines.append(f"class pixel share: {share or 'none'}; ignore {100 * total[-1] / max(total.sum(), 1):.1f}% "
                     "of all pixels")
    present = [c for c in range(NUM_CLASSES) if total[c] > 0]
    if meta.get("classes_present") not in (None, present):
        rep.problems.append(f"meta.json classes_present {meta['classes_present']} differ from the labels {present}")
    return rep
