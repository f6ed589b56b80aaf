"""Mapillary Vistas v1.2 and v2.0: palette PNGs whose index is the class; mapped to train ids by class name.

Layouts (docs/real_datasets.md, 'Mapillary Vistas'): the v1.x release (`{training,validation}/{images,labels}`
+ `config.json`) and the combined release (`{training,validation}/images`, `.../v1.2/labels`,
`.../v2.0/labels`, `config_v1.2.json`, `config_v2.0.json`). The class order is read from the config and
checked against the table's class names, so a v2.0 label can never go through the v1.2 table (or the reverse).
v1.2 uses the RobustNet/Pin-the-Memory DG table; v2.0 a table by name in the same spirit.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import ConversionError, DatasetSpec, Layout, Options, SplitPlan, find_root, layout_error, pair_up, scan
from .mappings import (MAPILLARY_V12_CLASSES, MAPILLARY_V12_TO_TRAIN, MAPILLARY_V20_CLASSES, MAPILLARY_V20_TO_TRAIN,
                       lut_from_names)
from .readers import LutDecoder

TITLE = "Mapillary Vistas"
LAYOUTS = (
    "v1.x release: {training,validation}/images/<key>.jpg, {training,validation}/labels/<key>.png, config.json",
    "combined v1.2+v2.0 release: {training,validation}/images/<key>.jpg, "
    "{training,validation}/{v1.2,v2.0}/labels/<key>.png, config_v1.2.json, config_v2.0.json",
)
FOLDERS = {"train": "training", "val": "validation"}
VERSIONS = {"1.2": (MAPILLARY_V12_CLASSES, MAPILLARY_V12_TO_TRAIN, "RobustNet/Pin-the-Memory DG table"),
            "2.0": (MAPILLARY_V20_CLASSES, MAPILLARY_V20_TO_TRAIN, "dgnb v2.0 table by class name")}
EXPECTED = {"train": 18000, "val": 2000}


def detect_layout(src: Path, opts: Options) -> Layout:
    """v1.x or combined release, for the requested --mapillary-version."""
    version = opts.mapillary_version
    if version not in VERSIONS:
        raise ConversionError(f"--mapillary-version must be one of {sorted(VERSIONS)}, got {version!r}.")
    root = find_root(src, ["validation/images"]) or find_root(src, ["training/images"])
    if root is None:
        raise layout_error(TITLE, src, LAYOUTS)
    if any((root / f / f"v{version}" / "labels").is_dir() for f in FOLDERS.values()):
        return Layout("combined", f"combined v1.2+v2.0 release, using v{version}/labels and config_v{version}.json",
                      root, {"labels": f"v{version}/labels", "config": root / f"config_v{version}.json"})
    if any((root / f / "labels").is_dir() for f in FOLDERS.values()):
        if version != "1.2":
            raise ConversionError(f"{root} is the v1.x release (labels/ without v2.0/): it has v1.2 labels only. "
                                  "Use --mapillary-version 1.2, or download the v2.0 release.")
        return Layout("v1.x", "v1.x release, labels/ and config.json", root,
                      {"labels": "labels", "config": root / "config.json"})
    raise layout_error(TITLE, src, LAYOUTS, f"No labels for v{version} under {root}/training or validation.\n")


def split_pairs(layout: Layout, split: str, opts: Options) -> SplitPlan:
    """Images and labels of training (train) or validation (val), paired by key."""
    folder = layout.root / FOLDERS[split]
    images = scan(folder / "images", [".jpg", ".png"])
    labels = scan(folder / layout.extra["labels"], [".png"])
    if not images:
        raise ConversionError(f"{folder / 'images'} holds no images: extract the Mapillary {FOLDERS[split]} set.")
    pairs, orphans = pair_up(images, labels)
    return SplitPlan(split, pairs, orphans, selection=f"{FOLDERS[split]}/ folder, paired by key",
                     expected=EXPECTED[split])


def config_class_names(config: Path) -> list[str]:
    """Class names in label-index order from a Mapillary config json ('readable', else 'name')."""
    try:
        labels = json.loads(config.read_text())["labels"]
        return [str(c.get("readable") or c["name"]) for c in labels]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"cannot read the class list of {config} ({e!r}); re-extract it from the Mapillary "
                              "archive.") from e


def label_decoder(layout: Layout, opts: Options) -> LutDecoder:
    version = opts.mapillary_version
    builtin, table, rule = VERSIONS[version]
    config: Path = layout.extra["config"]
    if config.is_file():
        names, origin = config_class_names(config), config.name
    else:
        names, origin = list(builtin), f"built-in v{version} class list ({config.name} not found)"
        print(f"  warning: {config} not found; assuming the v{version} class order of mmseg's MapillaryDataset.")
    lut, known, missing = lut_from_names(names, table)
    if missing:
        raise ConversionError(
            f"{origin} lacks {len(missing)} class(es) of the v{version} table, e.g. {missing[:4]}: these labels are "
            f"not Mapillary v{version} ({len(names)} classes found; v1.2 has 66, v2.0 has 124). "
            "Pass the matching --mapillary-version."
        )
    return LutDecoder(f"Mapillary Vistas v{version} ({len(names)} classes from {origin}) -> trainIds, {rule}",
                      lut, known, modes=("P", "L"), unknown=opts.unknown_ids,
                      fix=f"The v{version} config defines {len(names)} classes. ")


SPEC = DatasetSpec(
    kind="mapillary", title=TITLE, protocol="19", splits=("train", "val"), default_splits=("train", "val"),
    layouts=LAYOUTS, detect=detect_layout, plan=split_pairs, decoder=label_decoder,
    default_name=lambda o: "mapillary" if o.mapillary_version == "1.2" else "mapillary_v2",
)
