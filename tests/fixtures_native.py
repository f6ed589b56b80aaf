"""Tiny datasets in each benchmark's *native* on-disk format, with known content.

Each builder writes file names, folder nesting and label encodings as the real downloads do
(docs/real_datasets.md) and returns the train-id label it expects after conversion, computed from the
tables written out *here* (independently of data_tools.mappings), so a wrong table is caught.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# ----- expected mappings, written out from the datasets' own tables (not imported from data_tools) -------
CS_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
               26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                    18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
MAPILLARY_V12_TO_TRAIN = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8,
                          29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17,
                          52: 18}


def expected(native: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(native.shape, 255, np.uint8)
    for k, v in table.items():
        out[native == k] = v
    return out


# ----- file writers -------------------------------------------------------------------------------------
def noise_image(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = size
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_rgb(path: Path, rgb: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def save_grey(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def save_palette(path: Path, arr: np.ndarray, rng: np.random.Generator) -> None:
    """Palette PNG whose *index* is the class id; the palette colours are random (never to be decoded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tolist())
    im.save(path)


def blocky_labels(size: tuple[int, int], ids: list[int], rng: np.random.Generator, block: int = 4) -> np.ndarray:
    """A label map of `block`-pixel squares cycling through a shuffled `ids` (every id appears if room)."""
    h, w = size
    gh, gw = -(-h // block), -(-w // block)
    cells = np.resize(rng.permutation(ids), gh * gw).reshape(gh, gw)
    return np.repeat(np.repeat(cells, block, 0), block, 1)[:h, :w]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a.astype(np.int32) + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def png16_bytes(arr: np.ndarray) -> bytes:
    """A 16-bit RGB/RGBA PNG (as SYNTHIA's GT/LABELS); rows cycle through all five PNG filter types."""
    h, w, c = arr.shape
    raw = arr.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    bpp, prev, rows = c * 2, np.zeros(w * c * 2, np.uint8), []
    for y in range(h):
        row, kind = raw[y], y % 5
        left = np.concatenate([np.zeros(bpp, np.uint8), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.uint8), prev[:-bpp]])
        pred = [np.zeros_like(row), left, prev, ((left.astype(np.int32) + prev) // 2).astype(np.uint8),
                _paeth(left, prev, up_left).astype(np.uint8)][kind]
        rows.append(bytes([kind]) + (row - pred).astype(np.uint8).tobytes())
        prev = row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + _chunk(b"IEND", b""))


def _mat_element(dtype: int, payload: bytes) -> bytes:
    if len(payload) <= 4:  # small data element
        return struct.pack("<I", (len(payload) << 16) | dtype) + payload.ljust(4, b"\0")
    return struct.pack("<II", dtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def mat_v5_bytes(arrays: dict[str, np.ndarray], compress: bool = True) -> bytes:
    """A MATLAB level-5 .mat file holding column vectors (mxDOUBLE class; uint16 data when it fits, as MATLAB
    itself stores integer-valued doubles)."""
    out = [b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by the dgnb test fixtures".ljust(116, b" ")
           + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"]
    for name, values in arrays.items():
        values = np.asarray(values, dtype=np.float64).ravel()
        data = (_mat_element(4, values.astype("<u2").tobytes()) if values.max(initial=0) < 65536
                else _mat_element(9, values.astype("<f8").tobytes()))
        body = (_mat_element(6, struct.pack("<II", 6, 0)) + _mat_element(5, struct.pack("<ii", values.size, 1))
                + _mat_element(1, name.encode()) + data)
        matrix = struct.pack("<II", 14, len(body)) + body
        out.append(struct.pack("<II", 15, len(z := zlib.compress(matrix))) + z if compress else matrix)
    return b"".join(out)


# ----- GTAV ----------------------------------------------------------------------------------------------
def make_gtav(root: Path, frames: dict[str, list[int]], size=(24, 40), mismatch=(), black=(), seed=0,
              robustnet: bool = False, compress: bool = True) -> dict[str, np.ndarray]:
    """GTAV: images/NNNNN.png, palette labels/NNNNN.png (index = Cityscapes id), read_mapping/split.mat."""
    rng = np.random.default_rng(seed)
    want = {}
    folder = {"train": "train", "val": "valid", "test": "test"}
    for split, ids in frames.items():
        for i in ids:
            fid = f"{i:05d}"
            sub = Path(folder[split]) / "01" if robustnet else Path()
            img = np.zeros(size + (3,), np.uint8) if i in black else noise_image(size, rng)
            lab_size = (size[0] + 2, size[1]) if i in mismatch else size
            native = blocky_labels(lab_size, list(range(34)), rng)
            save_rgb(root / "images" / sub / f"{fid}.png", img)
            save_palette(root / "labels" / sub / f"{fid}.png", native, rng)
            want[fid] = expected(native, CS_TO_TRAIN)
    if not robustnet:
        mat = mat_v5_bytes({"trainIds": frames.get("train", []), "valIds": frames.get("val", []),
                            "testIds": frames.get("test", []), "a": [1]}, compress)
        (root / "read_mapping").mkdir(parents=True, exist_ok=True)
        (root / "read_mapping" / "split.mat").write_bytes(mat)
    return want


# ----- SYNTHIA -------------------------------------------------------------------------------------------
def make_synthia(root: Path, splits: dict[str, list[int]], size=(24, 40), seed=0, robustnet: bool = False,
                 lists_dir: Path | None = None) -> dict[str, np.ndarray]:
    """RAND_CITYSCAPES/RGB/NNNNNNN.png + GT/LABELS/NNNNNNN.png: 16-bit RGB, class in channel 0, instance id
    (> 255, so the high byte is set) in channel 1; optional RobustNet split lists."""
    rng = np.random.default_rng(seed)
    base = root / "RAND_CITYSCAPES"
    want = {}
    for split, ids in splits.items():
        sub = split if robustnet else ""
        for i in ids:
            fid = f"{i:07d}"
            cls = blocky_labels(size, list(range(23)), rng)
            inst = rng.integers(0, 1000, size) * (cls >= 8)
            lab = np.stack([cls, inst, np.zeros(size, int)], -1).astype(np.uint16)
            save_rgb(base / "RGB" / sub / f"{fid}.png", noise_image(size, rng))
            path = base / "GT" / "LABELS" / sub / f"{fid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png16_bytes(lab))
            save_rgb(base / "GT" / "COLOR" / sub / f"{fid}.png", noise_image(size, rng))  # decoy, never read
            want[fid] = expected(cls, SYNTHIA_TO_TRAIN)
        if lists_dir is not None:
            lists_dir.mkdir(parents=True, exist_ok=True)
            (lists_dir / f"synthia_split_{split}.txt").write_text("".join(f"{i:07d}.png\n" for i in ids))
    return want


# ----- Cityscapes ----------------------------------------------------------------------------------------
def make_cityscapes(root: Path, n: dict[str, int], size=(24, 48), seed=0, nested: bool = False
                    ) -> dict[str, np.ndarray]:
    """leftImg8bit/<split>/<city>/<city>_000000_NNNNNN_leftImg8bit.png + gtFine/..._gtFine_labelIds.png (L),
    with the _color.png and _polygons.json decoys of the real package."""
    rng = np.random.default_rng(seed)
    img_root = root / ("leftImg8bit_trainvaltest/leftImg8bit" if nested else "leftImg8bit")
    gt_root = root / ("gtFine_trainvaltest/gtFine" if nested else "gtFine")
    want = {}
    cities = {"train": ["aachen", "bochum"], "val": ["lindau", "munster"]}
    for split, count in n.items():
        for k in range(count):
            city = cities[split][k % 2]
            stem = f"{city}_000000_{k:06d}"
            native = blocky_labels(size, list(range(34)), rng)
            save_rgb(img_root / split / city / f"{stem}_leftImg8bit.png", noise_image(size, rng))
            save_grey(gt_root / split / city / f"{stem}_gtFine_labelIds.png", native)
            save_rgb(gt_root / split / city / f"{stem}_gtFine_color.png", noise_image(size, rng))
            (gt_root / split / city / f"{stem}_gtFine_polygons.json").write_text("{}")
            want[stem] = expected(native, CS_TO_TRAIN)
    return want


# ----- BDD100K -------------------------------------------------------------------------------------------
def make_bdd(root: Path, n: dict[str, int], size=(18, 32), seed=0, release: str = "2021") -> dict[str, np.ndarray]:
    """2021: bdd100k/images/10k/<split>/<hash>.jpg + labels/sem_seg/masks/<split>/<hash>.png;
    2018: bdd100k/seg/images/<split>/<hash>.jpg + seg/labels/<split>/<hash>_train_id.png."""
    rng = np.random.default_rng(seed)
    want = {}
    for split, count in n.items():
        for k in range(count):
            name = f"{rng.integers(16**8):08x}-{rng.integers(16**8):08x}"
            mask = blocky_labels(size, [*range(19), 255], rng)
            if release == "2021":
                img_path = root / "bdd100k/images/10k" / split / f"{name}.jpg"
                lbl_path = root / "bdd100k/labels/sem_seg/masks" / split / f"{name}.png"
                save_rgb(root / "bdd100k/labels/sem_seg/colormaps" / split / f"{name}.png", noise_image(size, rng))
            else:
                img_path = root / "bdd100k/seg/images" / split / f"{name}.jpg"
                lbl_path = root / "bdd100k/seg/labels" / split / f"{name}_train_id.png"
            save_rgb(img_path, noise_image(size, rng), "JPEG")
            save_grey(lbl_path, mask)
            want[name] = mask.astype(np.uint8)
    return want


# ----- Mapillary -----------------------------------------------------------------------------------------
def mapillary_config(names: list[str]) -> dict:
    return {"labels": [{"name": n.lower().replace(" ", "-"), "readable": n, "color": [i, i, i], "instances": False,
                        "evaluate": True} for i, n in enumerate(names)], "version": "fixture"}


def make_mapillary(root: Path, n: dict[str, int], v12_names: list[str], v20_names: list[str] | None = None,
                   size=(20, 30), seed=0) -> dict[str, dict[str, np.ndarray]]:
    """v1.x release ({training,validation}/{images,labels}, config.json) when `v20_names` is None, else the
    combined release (v1.2/labels, v2.0/labels, config_v1.2.json, config_v2.0.json). Returns the native
    labels per version."""
    rng = np.random.default_rng(seed)
    combined = v20_names is not None
    out: dict[str, dict[str, np.ndarray]] = {"1.2": {}, "2.0": {}}
    for split, count in n.items():
        folder = root / "mapillary" / {"train": "training", "val": "validation"}[split]
        for k in range(count):
            key = f"{split}{k:03d}_{rng.integers(16**10):010x}"
            save_rgb(folder / "images" / f"{key}.jpg", noise_image(size, rng), "JPEG")
            v12 = blocky_labels(size, list(range(len(v12_names))), rng, block=2)
            save_palette(folder / ("v1.2/labels" if combined else "labels") / f"{key}.png", v12, rng)
            out["1.2"][key] = v12
            if combined:
                v20 = blocky_labels(size, list(range(len(v20_names))), rng, block=2)
                save_palette(folder / "v2.0/labels" / f"{key}.png", v20, rng)
                out["2.0"][key] = v20
    if combined:
        (root / "mapillary/config_v1.2.json").write_text(json.dumps(mapillary_config(v12_names)))
        (root / "mapillary/config_v2.0.json").write_text(json.dumps(mapillary_config(v20_names)))
    else:
        (root / "mapillary/config.json").write_text(json.dumps(mapillary_config(v12_names)))
    return out


# ----- IDD -----------------------------------------------------------------------------------------------
def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


IDD_OBJECTS = [  # drawn in this order; (label, box x0 y0 x1 y1 inclusive, expected train id or None = not drawn)
    ("road", (0, 10, 39, 23), 0),
    ("sky", (0, 0, 39, 9), 10),
    ("non-drivable fallback", (30, 10, 39, 23), 9),
    ("autorickshaw", (2, 12, 9, 20), 255),
    ("cargroup", (12, 12, 19, 20), 13),
    ("person", (14, 14, 16, 22), 11),        # on top of the car group
    ("building", (20, 0, 29, 15), 2),
    ("vegetation", (22, 2, 27, 6), None),     # deleted: must not be drawn
    ("traffic light", (25, 1, 26, 4), 6),
]


def make_idd(root: Path, n: dict[str, int], size=(24, 40), seed=0, extra_objects=()) -> dict[str, np.ndarray]:
    """IDD_Segmentation/leftImg8bit/<split>/<drive>/<frame>_leftImg8bit.png + gtFine/.../_gtFine_polygons.json."""
    rng = np.random.default_rng(seed)
    want = {}
    h, w = size
    for split, count in n.items():
        for k in range(count):
            drive, frame = f"{k % 2 + 1}", f"{k // 2:06d}"  # frame names repeat across drives
            base = root / "IDD_Segmentation"
            save_rgb(base / "leftImg8bit" / split / drive / f"{frame}_leftImg8bit.png", noise_image(size, rng))
            lab = np.full(size, 255, np.uint8)
            objects = []
            for label, (x0, y0, x1, y1), train in IDD_OBJECTS:
                objects.append({"label": label, "polygon": rect(x0, y0, x1, y1), "deleted": int(train is None),
                                "id": len(objects), "user": "fixture", "verified": 1, "date": ""})
                if train is not None:
                    lab[y0 : y1 + 1, x0 : x1 + 1] = train
            objects += list(extra_objects)
            ann = {"imgHeight": h, "imgWidth": w, "objects": objects}
            path = base / "gtFine" / split / drive / f"{frame}_gtFine_polygons.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ann))
            want[f"{drive}_{frame}"] = lab
    return want


def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path} mode {im.mode}"
        return np.asarray(im)

