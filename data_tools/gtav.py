"""GTAV ("Playing for Data"): `images/NNNNN.png` + palette `labels/NNNNN.png` whose index is the Cityscapes id.

Splits (docs/real_datasets.md, 'GTAV'): the official `split.mat` (trainIds/valIds/testIds, 12,403 / 6,382 /
6,181); the DG papers' train list is the official one minus 15 single-colour frames (RobustNet, 12,388),
the default here (`--gtav-list dg`); `--split all` takes all 24,966 frames (UDA protocol). Pairs whose
image and label sizes differ and single-colour frames are dropped by default and listed in the manifest.
"""

from __future__ import annotations

from pathlib import Path

from .common import (ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_file, find_root,
                     layout_error, pair_up, scan, split_list)
from .mappings import CITYSCAPES_KNOWN, CITYSCAPES_LUT
from .readers import LutDecoder, read_mat_v5

TITLE = "GTAV (Playing for Data)"
LAYOUTS = (
    "native download (also mmseg/DAFormer): images/NNNNN.png and labels/NNNNN.png, with split.mat from "
    "read_mapping.zip anywhere up to two levels below --src (needed for train/val/test, not for 'all')",
    "RobustNet: images/{train,valid,test}/<folder>/NNNNN.png and labels/{train,valid,test}/<folder>/NNNNN.png",
)
#: Frames RobustNet removed from the official train split as single-colour (RobustNet issue #21).
DG_EXCLUDED: tuple[int, ...] = (12160, 12166, 12167, 12191, 12192, 12193, 12195, *range(12202, 12209), 19993)
MAT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}
ROBUSTNET_FOLDERS = {"train": "train", "val": "valid", "test": "test"}
EXPECTED = {"train/dg": 12388, "train/official": 12403, "val": 6382, "test": 6181, "all": 24966}


def detect_layout(src: Path, opts: Options) -> Layout:
    """Native flat folders (+ split.mat) or RobustNet's split folders."""
    root = find_root(src, ["images", "labels"])
    if root is not None and all((root / "images" / f).is_dir() for f in ROBUSTNET_FOLDERS.values()):
        return Layout("robustnet", "images|labels/{train,valid,test}/<folder>/NNNNN.png (RobustNet split folders)",
                      root)
    if root is not None and any(scan(root / "images", [".png"])):
        mat = find_file(root, "split.mat") or find_file(src, "split.mat")
        where = f"official split from {mat}" if mat else "no split.mat found"
        return Layout("native", f"flat images/ and labels/ (palette PNGs); {where}", root, {"split_mat": mat})
    raise layout_error(TITLE, src, LAYOUTS, "Extract the 10 image zips and the 10 label zips into one folder "
                       "(they create images/ and labels/), plus read_mapping.zip for split.mat.\n")


def _listed_ids(layout: Layout, split: str, opts: Options) -> tuple[list[str], str]:
    listed = split_list("gtav", split, opts, layout.root)
    if listed is not None:
        return listed
    mat = layout.extra.get("split_mat")
    if mat is None:
        raise ConversionError(
            f"GTAV '{split}' needs the official split: put split.mat (in read_mapping.zip on the GTAV download page) "
            "in --src, or pass RobustNet's lists (--split-dir .../split_data, or --split-file "
            f"{split}=gtav_split_{split}.txt), or convert --split all (the UDA protocol: all 24,966 frames)."
        )
    arrays = read_mat_v5(mat)
    key = MAT_KEYS[split]
    if key not in arrays:
        raise ConversionError(f"{mat} has no variable '{key}' (found {sorted(arrays)}); is it GTAV's split.mat?")
    return [f"{int(v):05d}" for v in arrays[key].ravel()], f"official split.mat '{key}'"


def _all_frames(images: dict[str, Path], labels: dict[str, Path]) -> list[str]:
    """Every frame number from 00001 to the highest found: a gap (a frame with neither image nor label)
    becomes an orphan, the signature of an archive part that was not fully downloaded (docs/real_datasets.md)."""
    found = set(images) | set(labels)
    numbers = [int(k) for k in found if k.isdigit()]
    return sorted(found | {f"{i:05d}" for i in range(1, max(numbers, default=0) + 1)})


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Pairs of train/val/test (official or DG list) or 'all' (written as 'train')."""
    if layout.variant == "robustnet":
        folders = list(ROBUSTNET_FOLDERS.values()) if split == "all" else [ROBUSTNET_FOLDERS[split]]
        images, labels = {}, {}
        for f in folders:
            images.update(scan(layout.root / "images" / f, [".png"], recursive=True))
            labels.update(scan(layout.root / "labels" / f, [".png"], recursive=True))
        pairs, orphans = pair_up(images, labels)
        selection = f"RobustNet folders {folders}"
    else:
        images, labels = scan(layout.root / "images", [".png"]), scan(layout.root / "labels", [".png"])
        ids, selection = (_all_frames(images, labels), "all frames (UDA protocol)") if split == "all" else (
            _listed_ids(layout, split, opts))
        pairs, orphans = pair_up(images, labels, ids)
    excluded = []
    if split == "train" and opts.gtav_list == "dg":
        drop = {f"{i:05d}" for i in DG_EXCLUDED}
        excluded = [{"id": p.id, "reason": "single-colour frame removed from the DG train list (RobustNet #21)"}
                    for p in pairs + orphans if p.id in drop]
        pairs, orphans = [p for p in pairs if p.id not in drop], [p for p in orphans if p.id not in drop]
        selection += " minus RobustNet's 15 single-colour frames"
    expected = EXPECTED.get(f"{split}/{opts.gtav_list}", EXPECTED.get(split))
    return SplitPlan("train" if split == "all" else split, pairs, orphans, excluded, selection, expected)


def label_decoder(layout: Layout, opts: Options) -> LutDecoder:
    return LutDecoder("GTAV palette index = Cityscapes labelId -> trainIds", CITYSCAPES_LUT, CITYSCAPES_KNOWN,
                      modes=("P", "L"), unknown=opts.unknown_ids,
                      fix="GTAV labels are palette PNGs whose index is a Cityscapes id 0..33. ")


SPEC = DatasetSpec(
    kind="gtav", title=TITLE, protocol="19", splits=("train", "val", "test", "all"),
    default_splits=("train", "val"), layouts=LAYOUTS, detect=detect_layout, plan=split_pairs,
    decoder=label_decoder, on_mismatch="drop", on_degenerate="drop",
)
