"""Cityscapes gtFine: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` + `gtFine/.../*_gtFine_labelIds.png`.

The label ids (0..33) go through the cityscapesScripts id -> trainId table; `*_labelTrainIds.png` is
not shipped and not needed (docs/real_datasets.md, 'Cityscapes').
"""

from __future__ import annotations

from pathlib import Path

from .common import (ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_root, layout_error, pair_up,
                     scan)
from .mappings import CITYSCAPES_KNOWN, CITYSCAPES_LUT
from .readers import LutDecoder

TITLE = "Cityscapes (gtFine)"
VARIANTS = {  # variant -> (image folder, label folder) relative to the root
    "flat": ("leftImg8bit", "gtFine"),
    "zip-nested": ("leftImg8bit_trainvaltest/leftImg8bit", "gtFine_trainvaltest/gtFine"),
}
LAYOUTS = (
    "flat (torchvision, mmseg): leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
    "zip-nested (RobustNet, Pin the Memory): leftImg8bit_trainvaltest/leftImg8bit/... and "
    "gtFine_trainvaltest/gtFine/...",
)
EXPECTED = {"train": 2975, "val": 500}
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def detect_layout(src: Path, opts: Options) -> Layout:
    """Flat or zip-nested Cityscapes tree."""
    for variant, (images, labels) in VARIANTS.items():
        root = find_root(src, [images, labels])
        if root is not None:
            return Layout(variant, f"images in {images}/, labels *{LABEL_SUFFIX} in {labels}/", root,
                          {"images": root / images, "labels": root / labels})
    raise layout_error(TITLE, src, LAYOUTS, "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
                       "and extract both into one folder.\n")


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Pairs of one official split folder (train 2,975 / val 500)."""
    img_dir, lbl_dir = layout.extra["images"] / split, layout.extra["labels"] / split
    images = scan(img_dir, [IMAGE_SUFFIX], recursive=True)
    labels = scan(lbl_dir, [LABEL_SUFFIX], recursive=True)
    if not images:
        raise ConversionError(f"{img_dir} holds no *{IMAGE_SUFFIX}: extract leftImg8bit_trainvaltest.zip completely.")
    if not labels and scan(lbl_dir, ["_gtFine_polygons.json"], recursive=True):
        raise ConversionError(f"{lbl_dir} has polygons but no *{LABEL_SUFFIX}: extract gtFine_trainvaltest.zip "
                              "completely (the labelIds PNGs are in it).")
    pairs, orphans = pair_up(images, labels)
    return SplitPlan(split, pairs, orphans, selection=f"official {split} folder", expected=EXPECTED.get(split))


def label_decoder(layout: Layout, opts: Options) -> LutDecoder:
    return LutDecoder("Cityscapes labelIds -> trainIds (cityscapesScripts labels.py)", CITYSCAPES_LUT,
                      CITYSCAPES_KNOWN, modes=("L", "P"), unknown=opts.unknown_ids,
                      fix="Cityscapes *_gtFine_labelIds.png hold ids 0..33 (never *_color.png). ")


SPEC = DatasetSpec(
    kind="cityscapes", title=TITLE, protocol="19", splits=("train", "val"), default_splits=("train", "val"),
    layouts=LAYOUTS, detect=detect_layout, plan=split_pairs, decoder=label_decoder,
)
