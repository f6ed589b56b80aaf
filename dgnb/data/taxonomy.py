"""The label space shared by every dataset: the 19 Cityscapes train ids, 255 = ignore.

Source: cityscapesScripts `helpers/labels.py`. Real datasets are converted to these ids by
`data_tools`; the procedural city renders them directly.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASSES)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# Cityscapes colour for each train id (RGB), used only for drawing: labels are never decoded from colour.
PALETTE = np.array(
    [
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
        [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
        [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
        [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
    ],
    dtype=np.uint8,
)

# Evaluation protocols as named class subsets (train ids). SYNTHIA has no terrain, truck or train
# (16 classes); the 13-class mIoU* also drops wall, fence and pole.
CLASS_SUBSETS: dict[str, tuple[int, ...]] = {
    "19": tuple(range(NUM_CLASSES)),
    "16": tuple(i for i in range(NUM_CLASSES) if CLASSES[i] not in ("terrain", "truck", "train")),
    "13": tuple(
        i for i in range(NUM_CLASSES)
        if CLASSES[i] not in ("terrain", "truck", "train", "wall", "fence", "pole")
    ),
}


class LabelError(ValueError):
    """A label map holds values that are not train ids (0..18) or 255."""


def check_label_values(label: np.ndarray, source: str = "label") -> None:
    """Raise LabelError naming `source` if `label` holds a value outside 0..18 and 255."""
    counts = np.bincount(np.asarray(label, np.uint8).ravel() if label.dtype == np.uint8 else label.ravel(), minlength=256)
    values = np.nonzero(counts)[0]
    bad = values[(values >= NUM_CLASSES) & (values != IGNORE_INDEX)]
    if bad.size:
        raise LabelError(
            f"{source}: values {bad.tolist()[:10]} are not Cityscapes train ids (0..{NUM_CLASSES - 1}, "
            f"{IGNORE_INDEX} = ignore). Convert the dataset with `python -m data_tools convert ...`, "
            "which maps native ids to train ids, instead of copying native label files."
        )


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map (H, W) of train ids -> RGB image (H, W, 3); ignore is drawn black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[label]
