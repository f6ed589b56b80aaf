"""IDD (India Driving Dataset, segmentation): label maps are rasterized from the gtFine polygons.

`leftImg8bit/<split>/<drive>/<frame>_leftImg8bit.png` + `gtFine/<split>/<drive>/<frame>_gtFine_polygons.json`.
Polygons are drawn in file order with PIL (later objects on top), as AutoNUE's json2labelImg does, and
their names go through the `csTrainId` column of anue_labels.py (autorickshaw -> ignore, non-drivable
fallback -> terrain). As in that tool, deleted objects and polygons of fewer than 3 points are skipped
(`readers.PolygonDecoder`). Sample ids are `<drive>_<frame>` because frame names repeat across drives.
"""

from __future__ import annotations

from pathlib import Path

from .common import ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_root, layout_error, pair_up, scan
from .mappings import IDD_NAME_TO_TRAIN
from .readers import PolygonDecoder

TITLE = "IDD Segmentation"
LAYOUTS = ("IDD_Segmentation: leftImg8bit/{train,val}/<drive>/<frame>_leftImg8bit.png and "
           "gtFine/{train,val}/<drive>/<frame>_gtFine_polygons.json",)
EXPECTED = {"train": 6993, "val": 981}
IMAGE_SUFFIXES = ("_leftImg8bit.png", "_leftImg8bit.jpg")
POLYGON_SUFFIX = "_gtFine_polygons.json"


def _sample_id(path: Path, suffix: str) -> str:
    return f"{path.parent.name}_{path.name[: -len(suffix)]}"


def detect_layout(src: Path, opts: Options) -> Layout:
    """The Cityscapes-like IDD tree with polygon annotations."""
    root = find_root(src, ["leftImg8bit", "gtFine"])
    if root is None:
        raise layout_error(TITLE, src, LAYOUTS)
    return Layout("polygons", "leftImg8bit/<split>/<drive>/ with gtFine/<split>/<drive>/*_gtFine_polygons.json "
                  "(label maps rasterized here)", root)


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Images and polygon files of one split, paired by drive and frame."""
    img_dir, lbl_dir = layout.root / "leftImg8bit" / split, layout.root / "gtFine" / split
    images = scan(img_dir, IMAGE_SUFFIXES, recursive=True, id_of=_sample_id)
    labels = scan(lbl_dir, [POLYGON_SUFFIX], recursive=True, id_of=_sample_id)
    if not images:
        raise ConversionError(f"{img_dir} holds no *_leftImg8bit images: extract the IDD segmentation archive.")
    if not labels:
        raise ConversionError(f"{lbl_dir} holds no *{POLYGON_SUFFIX}: IDD ships polygons only; extract gtFine.")
    pairs, orphans = pair_up(images, labels)
    return SplitPlan(split, pairs, orphans, selection=f"official {split} folder", expected=EXPECTED.get(split))


def label_decoder(layout: Layout, opts: Options) -> PolygonDecoder:
    return PolygonDecoder("IDD polygons -> csTrainId (AutoNUE anue_labels.py), drawn in file order, "
                          "polygons under 3 points skipped",
                          dict(IDD_NAME_TO_TRAIN), unknown=opts.unknown_ids)


SPEC = DatasetSpec(
    kind="idd", title=TITLE, protocol="19", splits=("train", "val"), default_splits=("train", "val"),
    layouts=LAYOUTS, detect=detect_layout, plan=split_pairs, decoder=label_decoder,
)
