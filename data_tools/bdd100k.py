"""BDD100K semantic segmentation (10K): masks already hold train ids (0..18, 255 = unknown).

Two releases (docs/real_datasets.md, 'BDD100K'): 2021 (`images/10k/<split>/*.jpg`, `labels/sem_seg/masks/<split>/*.png`)
and 2018 (`[seg/]images/<split>/*.jpg`, `[seg/]labels/<split>/*_train_id.png`). Images and masks are
paired by name; the 2021 download is known to hold a few orphans (report, then --allow-orphans).
The colormaps are never read (their wall/fence colours are swapped w.r.t. Cityscapes).
"""

from __future__ import annotations

from pathlib import Path

from .common import ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_root, layout_error, pair_up, scan
from .mappings import BDD_KNOWN_MASK, BDD_LUT
from .readers import LutDecoder

TITLE = "BDD100K semantic segmentation (10K)"
LAYOUTS = (
    "2021 release: images/10k/{train,val}/<name>.jpg and labels/sem_seg/masks/{train,val}/<name>.png",
    "2018 release (bdd100k_seg.zip; also RobustNet): [seg/]images/{train,val}/<name>.jpg and "
    "[seg/]labels/{train,val}/<name>_train_id.png",
)
EXPECTED = {"train": 7000, "val": 1000}


SEARCH_DEPTH = 3  # folder levels below --src searched for the layout (the 2021 zips nest one level deeper)


def detect_layout(src: Path, opts: Options) -> Layout:
    """2021 (images/10k + labels/sem_seg/masks) or 2018 (images + labels/*_train_id.png)."""
    root = find_root(src, ["images/10k", "labels/sem_seg/masks"], max_depth=SEARCH_DEPTH)
    if root is not None:
        return Layout("2021", "images/10k/<split>/*.jpg with labels/sem_seg/masks/<split>/*.png", root,
                      {"images": root / "images" / "10k", "labels": root / "labels" / "sem_seg" / "masks",
                       "suffix": ".png"})
    root = find_root(src, ["images/train", "labels/train"], max_depth=SEARCH_DEPTH) or find_root(
        src, ["images/val", "labels/val"], max_depth=SEARCH_DEPTH)
    if root is not None:
        return Layout("2018", "images/<split>/*.jpg with labels/<split>/*_train_id.png", root,
                      {"images": root / "images", "labels": root / "labels", "suffix": "_train_id.png"})
    raise layout_error(TITLE, src, LAYOUTS, "Extract the '10K Images' zip and the semantic segmentation labels "
                       "zip into one folder.\n", depth=SEARCH_DEPTH)


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Images and masks of one split, paired by name."""
    img_dir, lbl_dir = layout.extra["images"] / split, layout.extra["labels"] / split
    images = scan(img_dir, [".jpg", ".png"])
    labels = scan(lbl_dir, [layout.extra["suffix"]])
    if not images:
        raise ConversionError(f"{img_dir} holds no images: extract the BDD100K 10K images zip there.")
    if not labels:
        raise ConversionError(f"{lbl_dir} holds no *{layout.extra['suffix']} masks (colormaps cannot be used): "
                              "extract the semantic segmentation labels zip.")
    pairs, orphans = pair_up(images, labels)
    return SplitPlan(split, pairs, orphans, selection=f"{split} folder, paired by name", expected=EXPECTED.get(split))


def label_decoder(layout: Layout, opts: Options) -> LutDecoder:
    return LutDecoder("BDD100K sem_seg masks (train ids, 255 = unknown)", BDD_LUT, BDD_KNOWN_MASK,
                      modes=("L", "P"), unknown=opts.unknown_ids,
                      fix="BDD100K masks hold train ids 0..18 and 255. ")


SPEC = DatasetSpec(
    kind="bdd100k", title=TITLE, protocol="19", splits=("train", "val"), default_splits=("train", "val"),
    layouts=LAYOUTS, detect=detect_layout, plan=split_pairs, decoder=label_decoder,
)
