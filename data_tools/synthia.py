"""SYNTHIA-RAND-CITYSCAPES: `RGB/NNNNNNN.png` + 16-bit `GT/LABELS/NNNNNNN.png` (class id in channel 0).

The labels are read exactly (see readers.read_png16), never from GT/COLOR. The DG split (6,580 / 2,820)
is RobustNet's one-off random draw: it comes from its `split_data/synthia_split_{train,val}.txt` (pass
--split-dir) or from RobustNet's split folders; `--split all` takes all 9,400 views (UDA protocol).
SYNTHIA has no terrain, truck or train pixels: evaluate with the 16- or 13-class protocol.
"""

from __future__ import annotations

from pathlib import Path

from .common import (ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_root, layout_error, pair_up,
                     scan, split_list)
from .mappings import SYNTHIA_KNOWN, SYNTHIA_LUT
from .readers import LutDecoder

TITLE = "SYNTHIA-RAND-CITYSCAPES"
LAYOUTS = (
    "native package (also DAFormer/mmseg): RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png; train/val additionally "
    "need RobustNet's split_data/synthia_split_{train,val}.txt (--split-dir)",
    "RobustNet: RGB/{train,val}/NNNNNNN.png and GT/LABELS/{train,val}/NNNNNNN.png",
)
EXPECTED = {"train": 6580, "val": 2820, "all": 9400}
LIST_HELP = ("SYNTHIA's DG split (6,580 train / 2,820 val) is RobustNet's one-off random draw and cannot be "
             "regenerated: download split_data/synthia_split_train.txt and synthia_split_val.txt from "
             "https://github.com/shachoi/RobustNet (BSD-3-Clause) and pass --split-dir FOLDER, or convert "
             "--split all (the UDA protocol: all 9,400 views).")


def detect_layout(src: Path, opts: Options) -> Layout:
    """Native package or RobustNet split folders; GT/COLOR alone is refused."""
    root = find_root(src, ["RGB", "GT/LABELS"])
    if root is None:
        colour = find_root(src, ["RGB", "GT/COLOR"])
        if colour is not None:
            raise ConversionError(
                f"{colour}/GT has COLOR but no LABELS. GT/COLOR renderings cannot be used as labels (wall and lane "
                "marking share a colour; fence's colour differs from Cityscapes'). Extract GT/LABELS from the "
                "SYNTHIA-RAND-CITYSCAPES archive."
            )
        raise layout_error(TITLE, src, LAYOUTS)
    if (root / "RGB" / "train").is_dir() and (root / "GT" / "LABELS" / "train").is_dir():
        return Layout("robustnet", "RGB|GT/LABELS/{train,val}/ (RobustNet split folders), 16-bit labels", root)
    return Layout("native", "flat RGB/ and GT/LABELS/ (16-bit PNG, class id in the first channel)", root,
                  {"src": src})


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Pairs of the DG train/val split, or 'all' (written as 'train')."""
    name = "train" if split == "all" else split
    if layout.variant == "robustnet":
        folders = ["train", "val"] if split == "all" else [split]
        images, labels = {}, {}
        for f in folders:
            images.update(scan(layout.root / "RGB" / f, [".png"]))
            labels.update(scan(layout.root / "GT" / "LABELS" / f, [".png"]))
        pairs, orphans = pair_up(images, labels)
        return SplitPlan(name, pairs, orphans, selection=f"RobustNet folders {folders}", expected=EXPECTED[split])
    images, labels = scan(layout.root / "RGB", [".png"]), scan(layout.root / "GT" / "LABELS", [".png"])
    if split == "all":
        ids, selection = None, "all views (UDA protocol)"
    else:
        listed = split_list("synthia", split, opts, layout.root) or split_list("synthia", split, opts,
                                                                                 layout.extra["src"])
        if listed is None:
            raise ConversionError(f"no list for SYNTHIA '{split}'. {LIST_HELP}")
        ids, selection = listed
    pairs, orphans = pair_up(images, labels, ids)
    return SplitPlan(name, pairs, orphans, selection=selection, expected=EXPECTED[split])


def label_decoder(layout: Layout, opts: Options) -> LutDecoder:
    return LutDecoder("SYNTHIA class id (16-bit, channel 0) -> trainIds (RobustNet/DAFormer table)", SYNTHIA_LUT,
                      SYNTHIA_KNOWN, channel16=0, unknown=opts.unknown_ids,
                      fix="SYNTHIA GT/LABELS hold class ids 0..22 in the first channel. ")


SPEC = DatasetSpec(
    kind="synthia", title=TITLE, protocol="16", splits=("train", "val", "all"), default_splits=("train", "val"),
    layouts=LAYOUTS, detect=detect_layout, plan=split_pairs, decoder=label_decoder,
)
