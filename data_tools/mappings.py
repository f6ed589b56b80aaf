"""Explicit lookup tables from each dataset's native label ids to the 19 Cityscapes train ids.

Every table is written out here (sources: docs/real_datasets.md, one section per dataset) and turned into a numpy
lookup array: `lut[native_label]` maps a whole label image at once, and `known[native_label]` tells
which native ids the format defines (anything else is an error, never a silent 255).
Labels are always read as index images; colour renderings are never decoded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from dgnb.data.taxonomy import IGNORE_INDEX, NUM_CLASSES

# ----- Cityscapes (cityscapesScripts helpers/labels.py) and GTAV (same ids) ------------------------
#: Cityscapes label id -> train id; ids 0..33 exist, the other 15 map to ignore.
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_NUM_IDS = 34

# ----- SYNTHIA-RAND-CITYSCAPES (package README; RobustNet and DAFormer agree) -----------------------
SYNTHIA_CLASSES: tuple[str, ...] = (
    "void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
    "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work", "traffic light", "terrain", "rider",
    "truck", "bus", "train", "wall", "lanemarking",
)
#: SYNTHIA class id (first channel of the 16-bit GT/LABELS png) -> train id; 0, 13, 14, 22 -> ignore.
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# ----- BDD100K sem_seg masks: already train ids -----------------------------------------------------
BDD_ID_TO_TRAIN: dict[int, int] = {i: i for i in range(NUM_CLASSES)}
BDD_KNOWN: tuple[int, ...] = (*range(NUM_CLASSES), IGNORE_INDEX)

# ----- Mapillary Vistas ------------------------------------------------------------------------------
#: v1.2 class order (index = pixel value), 66 classes; checked against config.json at run time.
MAPILLARY_V12_CLASSES: tuple[str, ...] = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge", "Building",
    "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox", "Manhole",
    "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole", "Traffic Light",
    "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle",
    "Unlabeled",
)
#: v1.2 -> train id, the DG convention of RobustNet / Pin the Memory (25 classes, rest ignore).
MAPILLARY_V12_TO_TRAIN: dict[str, int] = {
    "Road": 0, "Lane Marking - General": 0, "Manhole": 0,
    "Curb": 1, "Sidewalk": 1,
    "Building": 2, "Wall": 3, "Fence": 4,
    "Pole": 5, "Utility Pole": 5,
    "Traffic Light": 6, "Traffic Sign (Front)": 7,
    "Vegetation": 8, "Terrain": 9, "Sky": 10, "Person": 11,
    "Bicyclist": 12, "Motorcyclist": 12, "Other Rider": 12,
    "Car": 13, "Truck": 14, "Bus": 15, "On Rails": 16, "Motorcycle": 17, "Bicycle": 18,
}

#: v2.0 class order (mmseg MapillaryDataset_v2), 124 classes; config_v2.0.json is authoritative.
MAPILLARY_V20_CLASSES: tuple[str, ...] = (
    "Bird", "Ground Animal", "Ambiguous Barrier", "Concrete Block", "Curb", "Fence", "Guard Rail", "Barrier",
    "Road Median", "Road Side", "Lane Separator", "Temporary Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Driveway", "Parking", "Parking Aisle", "Pedestrian Area", "Rail Track", "Road", "Road Shoulder",
    "Service Lane", "Sidewalk", "Traffic Island", "Bridge", "Building", "Garage", "Tunnel", "Person", "Person Group",
    "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Dashed Line", "Lane Marking - Straight Line",
    "Lane Marking - Zigzag Line", "Lane Marking - Ambiguous", "Lane Marking - Arrow (Left)",
    "Lane Marking - Arrow (Other)", "Lane Marking - Arrow (Right)", "Lane Marking - Arrow (Split Left or Straight)",
    "Lane Marking - Arrow (Split Right or Straight)", "Lane Marking - Arrow (Straight)", "Lane Marking - Crosswalk",
    "Lane Marking - Give Way (Row)", "Lane Marking - Give Way (Single)", "Lane Marking - Hatched (Chevron)",
    "Lane Marking - Hatched (Diagonal)", "Lane Marking - Other", "Lane Marking - Stop Line",
    "Lane Marking - Symbol (Bicycle)", "Lane Marking - Symbol (Other)", "Lane Marking - Text",
    "Lane Marking (only) - Dashed Line", "Lane Marking (only) - Crosswalk", "Lane Marking (only) - Other",
    "Lane Marking (only) - Test", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner",
    "Bench", "Bike Rack", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox", "Manhole",
    "Parking Meter", "Phone Booth", "Pothole", "Signage - Advertisement", "Signage - Ambiguous", "Signage - Back",
    "Signage - Information", "Signage - Other", "Signage - Store", "Street Light", "Pole", "Pole Group",
    "Traffic Sign Frame", "Utility Pole", "Traffic Cone", "Traffic Light - General (Single)",
    "Traffic Light - Pedestrians", "Traffic Light - General (Upright)", "Traffic Light - General (Horizontal)",
    "Traffic Light - Cyclists", "Traffic Light - Other", "Traffic Sign - Ambiguous", "Traffic Sign (Back)",
    "Traffic Sign - Direction (Back)", "Traffic Sign - Direction (Front)", "Traffic Sign (Front)",
    "Traffic Sign - Parking", "Traffic Sign - Temporary (Back)", "Traffic Sign - Temporary (Front)", "Trash Can",
    "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck",
    "Vehicle Group", "Wheeled Slow", "Water Valve", "Car Mount", "Dynamic", "Ego Vehicle", "Ground", "Static",
    "Unlabeled",
)
_V20_LANE_MARKINGS = tuple(
    n for n in MAPILLARY_V20_CLASSES if n.startswith("Lane Marking") and "Crosswalk" not in n
)
#: v2.0 -> train id, by class name, in the spirit of the v1.2 DG rule (docs/real_datasets.md, 'Mapillary Vistas'):
#: lane markings (except crosswalk markings, as in v1.2) and manholes are road; all six traffic-light kinds are traffic
#: light; the three front-facing traffic-sign kinds are traffic sign; groups stay ignore (as Cityscapes).
MAPILLARY_V20_TO_TRAIN: dict[str, int] = {
    "Road": 0, **{n: 0 for n in _V20_LANE_MARKINGS}, "Manhole": 0,
    "Curb": 1, "Sidewalk": 1,
    "Building": 2, "Wall": 3, "Fence": 4,
    "Pole": 5, "Utility Pole": 5,
    **{n: 6 for n in MAPILLARY_V20_CLASSES if n.startswith("Traffic Light - ")},
    "Traffic Sign (Front)": 7, "Traffic Sign - Direction (Front)": 7, "Traffic Sign - Temporary (Front)": 7,
    "Vegetation": 8, "Terrain": 9, "Sky": 10, "Person": 11,
    "Bicyclist": 12, "Motorcyclist": 12, "Other Rider": 12,
    "Car": 13, "Truck": 14, "Bus": 15, "On Rails": 16, "Motorcycle": 17, "Bicycle": 18,
}

# ----- IDD (AutoNUE helpers/anue_labels.py, csTrainId column) -------------------------------------------
#: IDD polygon label name -> Cityscapes train id. Autorickshaw, curb, billboard ... are ignore.
IDD_NAME_TO_TRAIN: dict[str, int] = {
    "road": 0, "parking": 255, "drivable fallback": 255, "sidewalk": 1, "rail track": 255,
    "non-drivable fallback": 9, "person": 11, "animal": 255, "rider": 12, "motorcycle": 17, "bicycle": 18,
    "autorickshaw": 255, "car": 13, "truck": 14, "bus": 15, "caravan": 255, "trailer": 255, "train": 16,
    "vehicle fallback": 255, "curb": 255, "wall": 3, "fence": 4, "guard rail": 255, "billboard": 255,
    "traffic sign": 7, "traffic light": 6, "pole": 5, "polegroup": 255, "obs-str-bar-fallback": 255,
    "building": 2, "bridge": 255, "tunnel": 255, "vegetation": 8, "sky": 10, "fallback background": 255,
    "unlabeled": 255, "ego vehicle": 255, "rectification border": 255, "out of roi": 255, "license plate": 255,
}


# ----- building lookup arrays ----------------------------------------------------------------------------
def build_lut(table: Mapping[int, int], known: Sequence[int], size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(lut, known) arrays of length `size`: lut[id] = train id (default 255), known[id] = id is defined."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    ok = np.zeros(size, dtype=bool)
    ok[list(known)] = True
    for native, train in table.items():
        if not ok[native]:
            raise ValueError(f"table maps id {native}, which the format does not define")
        lut[native] = train
    return lut, ok


def normalize_name(name: str) -> str:
    """Class-name key tolerant to case and spacing: 'Crosswalk - Plain' == 'crosswalk-plain'."""
    return re.sub(r"[\s_]+", "", name.lower())


def lut_from_names(
    class_names: Sequence[str], table: Mapping[str, int], size: int = 256
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(lut, known, missing): class index -> train id through `table` keyed by class name.

    `missing` lists table names absent from `class_names` (a sign of a wrong config/version)."""
    if len(class_names) > size:
        raise ValueError(f"{len(class_names)} classes do not fit a {size}-entry lookup table")
    index = {normalize_name(n): i for i, n in enumerate(class_names)}
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(size, dtype=bool)
    known[: len(class_names)] = True
    missing = []
    for name, train in table.items():
        i = index.get(normalize_name(name))
        if i is None:
            missing.append(name)
        else:
            lut[i] = train
    return lut, known, missing


CITYSCAPES_LUT, CITYSCAPES_KNOWN = build_lut(CITYSCAPES_ID_TO_TRAIN, range(CITYSCAPES_NUM_IDS))
SYNTHIA_LUT, SYNTHIA_KNOWN = build_lut(SYNTHIA_ID_TO_TRAIN, range(len(SYNTHIA_CLASSES)), size=1 << 16)
BDD_LUT, BDD_KNOWN_MASK = build_lut(BDD_ID_TO_TRAIN, BDD_KNOWN)
