"""Readers for native label formats and the label decoders the converters hand to the workers.

- `read_index_png`: palette/grey PNGs whose pixel value is the class id (Cityscapes, GTAV, Mapillary, BDD).
- `read_png16`: 16-bit-per-channel RGB(A) PNGs (SYNTHIA GT/LABELS). PIL has no 16-bit RGB mode and
  silently keeps only the high byte (every class id < 256 becomes 0); we let PIL's C decoder unfilter
  the rows twice, once keeping the high bytes and once the low bytes, and recombine them.
- `read_mat_v5`: numeric arrays of a MATLAB v5 .mat file (GTAV `split.mat`), no scipy needed.
- `LutDecoder` / `PolygonDecoder`: picklable callables `path -> uint8 train-id array`.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .common import ConversionError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----- PNG index images ------------------------------------------------------------------------------
def read_index_png(path: Path, modes: tuple[str, ...] = ("L", "P")) -> np.ndarray:
    """Pixel values (class ids) of a single-channel PNG; colour renderings are refused."""
    try:
        with Image.open(path) as im:
            if im.mode not in modes:
                hint = (" It looks like a colour rendering: use the id/index images instead (colours are"
                        " ambiguous, e.g. pole and polegroup share a colour)." if im.mode in ("RGB", "RGBA") else "")
                raise ConversionError(
                    f"label {path} has PIL mode {im.mode}, expected one of {list(modes)} (a single-channel image "
                    f"whose pixel values are class ids).{hint} Re-extract the original label files."
                )
            im.load()
            return np.asarray(im)
    except ConversionError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ConversionError(f"cannot decode label {path} ({e}): the file is truncated or not a PNG. "
                              "Re-extract it from the archive and rerun (conversion resumes).") from e


def png_header(data: bytes, path: Path) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from a PNG's IHDR chunk."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ConversionError(f"{path} is not a PNG file (bad signature); re-extract it from the archive.")
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, ctype, interlace


def _decode_with_rawmode(data: bytes, rawmode: str) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    if len(im.tile) != 1:
        raise ValueError(f"unexpected PNG tile layout {im.tile}")
    tile = im.tile[0]
    im.tile = [tile._replace(args=rawmode) if hasattr(tile, "_replace") else (*tile[:3], rawmode)]
    im.load()
    return np.asarray(im)


def read_png16(path: Path) -> np.ndarray:
    """(H, W, C) uint16 channels of a 16-bit RGB/RGBA PNG, exact (no high-byte truncation)."""
    data = path.read_bytes()
    _, _, depth, ctype, interlace = png_header(data, path)
    if depth != 16 or ctype not in (2, 6):
        kind = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}.get(ctype, f"type {ctype}")
        raise ConversionError(
            f"{path} is a {depth}-bit {kind} PNG; SYNTHIA GT/LABELS files are 16-bit RGB with the class id in the "
            "first channel. This file was re-saved by a tool that dropped the low byte, or it is a GT/COLOR "
            "rendering: re-extract GT/LABELS from the SYNTHIA archive."
        )
    if interlace:
        raise ConversionError(f"{path} is an interlaced 16-bit PNG, which data_tools cannot read exactly; "
                              "re-extract the original file (SYNTHIA labels are not interlaced).")
    mode = "RGB" if ctype == 2 else "RGBA"
    try:
        high = _decode_with_rawmode(data, f"{mode};16B")
        low = _decode_with_rawmode(data, f"{mode};16L")
    except (OSError, SyntaxError, ValueError) as e:
        raise ConversionError(f"cannot decode label {path} ({e}): the file is truncated or corrupt. "
                              "Re-extract it from the archive and rerun (conversion resumes).") from e
    return (high.astype(np.uint16) << 8) | low


# ----- decoders ------------------------------------------------------------------------------------------
def check_known(native: np.ndarray, known: np.ndarray, path: Path, table: str, fix: str = "") -> None:
    """Raise ConversionError if `native` holds ids the format does not define."""
    counts = np.bincount(native.ravel(), minlength=len(known))
    defined = np.zeros(len(counts), dtype=bool)
    defined[: len(known)] = known
    bad = np.flatnonzero((counts > 0) & ~defined)
    if bad.size:
        raise ConversionError(
            f"label {path} holds ids {bad[:10].tolist()} ({int(counts[bad].sum())} pixels) that {table} does not "
            f"define (known ids: {np.flatnonzero(known)[:3].tolist()}...{np.flatnonzero(known)[-3:].tolist()}). "
            f"{fix}If your copy legitimately contains them, rerun with --unknown-ids ignore to map them to 255."
        )


@dataclass
class LutDecoder:
    """Native index label -> train ids through a lookup array (`lut[native]`), refusing unknown ids."""

    name: str
    lut: np.ndarray
    known: np.ndarray
    modes: tuple[str, ...] = ("L", "P")
    channel16: int | None = None   # read this channel of a 16-bit RGB PNG (SYNTHIA) instead of an index PNG
    unknown: str = "error"         # error | ignore
    fix: str = ""

    def read(self, path: Path) -> np.ndarray:
        if self.channel16 is not None:
            return read_png16(path)[..., self.channel16]
        return read_index_png(path, self.modes)

    def __call__(self, path: Path) -> np.ndarray:
        native = self.read(path)
        if self.unknown == "error":
            check_known(native, self.known, path, self.name, self.fix)
        return self.lut[native]


@dataclass
class PolygonDecoder:
    """Cityscapes-style polygon JSON -> train ids, drawn in file order (later objects on top), like the
    dataset authors' json2labelImg (AutoNUE public-code, Cityscapes scripts): background 255 (the
    `unlabeled` row), objects marked deleted or with fewer than 3 points skipped (PIL would draw them
    as a line or a dot), '<name>group' falls back to '<name>', every other polygon filled with PIL's
    `ImageDraw.polygon` at the coordinates as written. An unknown label is an error here (the authors'
    tool prints a warning and skips the object, which `unknown="ignore"` reproduces)."""

    name: str
    table: dict[str, int] = field(default_factory=dict)
    unknown: str = "error"

    def _load(self, path: Path) -> dict:
        try:
            ann = json.loads(path.read_text())
            return ann if isinstance(ann, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"cannot read polygon file {path} ({e}): truncated or not JSON. "
                                  "Re-extract it from the archive and rerun.") from e

    def __call__(self, path: Path) -> np.ndarray:
        ann = self._load(path)
        try:
            size = (int(ann["imgWidth"]), int(ann["imgHeight"]))
            objects = list(ann["objects"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path} lacks imgWidth/imgHeight/objects ({e}); it is not a gtFine polygons "
                                  "file.") from e
        canvas = Image.new("L", size, 255)
        draw = ImageDraw.Draw(canvas)
        for k, obj in enumerate(objects):
            points = [(float(p[0]), float(p[1])) for p in obj.get("polygon", [])]
            if obj.get("deleted") or len(points) < 3:  # json2labelImg skips both before looking at the label
                continue
            label = str(obj.get("label", ""))
            if label not in self.table and label.endswith("group"):
                label = label[: -len("group")]
            if label not in self.table:
                if self.unknown == "error":
                    raise ConversionError(
                        f"{path}: object {k} has label '{obj.get('label')}', which {self.name} does not define "
                        f"(known: {sorted(self.table)[:5]}...). Check that this is an IDD gtFine file; rerun with "
                        "--unknown-ids ignore to leave such objects unlabelled (255)."
                    )
                continue
            draw.polygon(points, fill=self.table[label])
        return np.asarray(canvas)


# ----- MATLAB v5 .mat files -------------------------------------------------------------------------------
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE .. mxUINT64


def _element(buf: bytes, pos: int, endian: str) -> tuple[int, bytes, int]:
    """(data type, payload, next position) of the data element at `pos`."""
    (first,) = struct.unpack_from(endian + "I", buf, pos)
    if first >> 16:  # small data element: type and size packed in 4 bytes, data in the next 4
        n = first >> 16
        return first & 0xFFFF, buf[pos + 4 : pos + 4 + n], pos + 8
    dtype, n = struct.unpack_from(endian + "II", buf, pos)
    start = pos + 8
    end = start + n
    if end > len(buf):
        raise ValueError("data element runs past the end of the file")
    return dtype, buf[start:end], (end if dtype == _MI_COMPRESSED else end + (-n % 8))


def _matrix(payload: bytes, endian: str) -> tuple[str, np.ndarray | None]:
    pos = 0
    _, flags, pos = _element(payload, pos, endian)
    mx_class = struct.unpack_from(endian + "I", flags)[0] & 0xFF
    _, dims_raw, pos = _element(payload, pos, endian)
    dims = np.frombuffer(dims_raw, dtype=endian + "i4")
    _, name, pos = _element(payload, pos, endian)
    if mx_class not in _NUMERIC_CLASSES:
        return name.decode("latin-1"), None
    dtype, real, pos = _element(payload, pos, endian)
    values = np.frombuffer(real, dtype=endian + _MI_DTYPES[dtype])
    return name.decode("latin-1"), values.reshape(tuple(dims), order="F")


def read_mat_v5(path: Path) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB level-5 MAT-file (compressed or not); other classes are skipped."""
    data = Path(path).read_bytes()
    fix = "Pass the split as text lists instead (--split-file train=gtav_split_train.txt ...)."
    if data[:10] == b"MATLAB 7.3" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise ConversionError(f"{path} is a MATLAB 7.3 (HDF5) file, which data_tools cannot read. {fix}")
    if len(data) < 128 or not data[:6] == b"MATLAB" or data[126:128] not in (b"IM", b"MI"):
        raise ConversionError(f"{path} is not a MATLAB 5 .mat file (bad header). {fix}")
    endian = "<" if data[126:128] == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    pos = 128
    try:
        while pos + 8 <= len(data):
            dtype, payload, pos = _element(data, pos, endian)
            if dtype == _MI_COMPRESSED:
                dtype, payload, _ = _element(zlib.decompress(payload), 0, endian)
            if dtype == _MI_MATRIX:
                name, values = _matrix(payload, endian)
                if values is not None:
                    out[name] = values
    except (struct.error, zlib.error, ValueError, KeyError) as e:
        raise ConversionError(f"{path} is truncated or corrupt ({e!r}). {fix}") from e
    return out
