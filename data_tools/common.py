"""The conversion machinery shared by every dataset: layout/split plans, the worker pool, resume,
manifests and meta.json.

A dataset module supplies a `DatasetSpec`: `detect(src) -> Layout`, `plan(layout, split) -> SplitPlan`
(the (image, label) pairs of one split, orphans and rule-based exclusions) and `decoder(layout) ->
callable(label path) -> uint8 train ids`. `convert()` does the rest, identically for all datasets:

    <dst>/<name>/<split>/images/<id>.png|jpg     copied as is, or re-encoded when resized
    <dst>/<name>/<split>/labels/<id>.png         uint8 train ids 0..18, 255 = ignore
    <dst>/<name>/<split>/manifest.json           counts, sizes, class pixel frequencies, orphans, exclusions
    <dst>/<name>/<split>/.progress.jsonl         resume record (one line per finished pair)
    <dst>/<name>/meta.json                       written last, only when every split converted cleanly

Every file is written atomically (temporary file + rename). A rerun skips pairs whose outputs exist
with the sizes recorded in the progress file and whose sources are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dgnb.data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES
from dgnb.io import atomic_write_bytes, atomic_write_json, encode_png

CONVERTER_VERSION = 1
SQUARE_RULE = "robustnet-resize-height-bicubic"  # what --square does (part of the resume fingerprint)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEGENERATE_STD = 1.0  # an image whose pixel std is below this is "single colour"
MISMATCH_POLICIES = ("error", "drop", "resize")
DEGENERATE_POLICIES = ("keep", "drop")

Decoder = Callable[[Path], np.ndarray]


class ConversionError(RuntimeError):
    """A native download cannot be converted as it is; the message names the file or value and the fix."""


# ----- plans ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One sample: output id, native image and native label (None when missing)."""

    id: str
    image: Path | None
    label: Path | None

    @property
    def missing(self) -> str:
        return "image and label" if self.image is None and self.label is None else (
            "image" if self.image is None else "label")


@dataclass
class Layout:
    """The variant of a native download that `detect` found."""

    variant: str
    description: str
    root: Path
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitPlan:
    """Members of one output split, decided before any pixel is read."""

    name: str                                  # output split folder (train, val, test)
    pairs: list[Pair]
    orphans: list[Pair] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)   # rule-based, e.g. documented frame lists
    selection: str = ""                        # how members were chosen (printed and stored in the manifest)
    expected: int | None = None                # the count the dataset and papers report, for comparison only


@dataclass
class Options:
    """Everything `convert` accepts besides the dataset kind and folders (the CLI flags)."""

    splits: Sequence[str] | None = None
    resize: int | None = None                  # short side in pixels (images bilinear, labels nearest)
    square: bool = False                       # with resize: height -> resize, bicubic, centre square (RobustNet)
    workers: int = 1
    name: str | None = None                    # output dataset folder (default: the kind)
    split_files: dict[str, Path] = field(default_factory=dict)
    split_dir: Path | None = None
    gtav_list: str = "dg"                      # dg: official split minus RobustNet's 15 frames | official
    mapillary_version: str = "1.2"
    on_mismatch: str | None = None             # error | drop | resize (None: the dataset's default)
    on_degenerate: str | None = None           # keep | drop (None: the dataset's default)
    unknown_ids: str = "error"                 # error | ignore
    allow_orphans: bool = False
    limit: int | None = None
    progress: bool = True
    dry_run: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset module provides to `convert`."""

    kind: str
    title: str
    protocol: str                              # default evaluation class subset when this is the source
    splits: tuple[str, ...]                    # split names `plan` accepts
    default_splits: tuple[str, ...]
    layouts: tuple[str, ...]                   # accepted layouts, for error messages and --help
    detect: Callable[[Path, Options], Layout]
    plan: Callable[[Layout, str, Options], SplitPlan]
    decoder: Callable[[Layout, Options], Decoder]
    on_mismatch: str = "error"
    on_degenerate: str = "keep"
    default_name: Callable[[Options], str] | None = None

    def output_name(self, opts: Options) -> str:
        return opts.name or (self.default_name(opts) if self.default_name else self.kind)


# ----- scanning and pairing -----------------------------------------------------------------------------
def scan(folder: Path, suffixes: Sequence[str], recursive: bool = False,
         id_of: Callable[[Path, str], str] | None = None) -> dict[str, Path]:
    """id -> file for the files in `folder` whose name ends with one of `suffixes` (case-insensitive).

    The id is the name minus the suffix, or `id_of(path, suffix)`; two files with one id are an error."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    lowered = [s.lower() for s in suffixes]
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            low = name.lower()
            suffix = next((s for s in lowered if low.endswith(s)), None)
            if suffix is None or name.startswith("."):
                continue
            path = Path(dirpath) / name
            key = id_of(path, suffix) if id_of else name[: -len(suffix)]
            if key in out:
                raise ConversionError(f"two files map to the same sample id '{key}': {out[key]} and {path}. "
                                      "Remove the duplicate (e.g. a second extracted copy) and rerun.")
            out[key] = path
    return out


def pair_up(images: dict[str, Path], labels: dict[str, Path],
            ids: Iterable[str] | None = None) -> tuple[list[Pair], list[Pair]]:
    """(pairs with both files, orphans) over `ids` (default: every id seen), in id order."""
    keys = sorted(set(images) | set(labels)) if ids is None else list(dict.fromkeys(ids))
    every = [Pair(k, images.get(k), labels.get(k)) for k in keys]
    return ([p for p in every if p.image is not None and p.label is not None],
            [p for p in every if p.image is None or p.label is None])


def find_root(src: Path, required: Sequence[str], max_depth: int = 2) -> Path | None:
    """The first folder at most `max_depth` levels below `src` (breadth first) holding every `required` path."""
    queue: deque[tuple[Path, int]] = deque([(src, 0)])
    while queue:
        folder, depth = queue.popleft()
        if all((folder / r).exists() for r in required):
            return folder
        if depth < max_depth:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            queue.extend((c, depth + 1) for c in children)
    return None


def find_file(src: Path, name: str, max_depth: int = 2) -> Path | None:
    root = find_root(src, [name], max_depth)
    return root / name if root is not None else None


def listing(src: Path, limit: int = 12) -> str:
    """A short listing of what `src` holds, for 'wrong layout' messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in src.iterdir())
    except OSError:
        return "(unreadable)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(empty)"


def layout_error(spec_title: str, src: Path, layouts: Sequence[str], extra: str = "",
                 depth: int = 2) -> ConversionError:
    """'Wrong layout' error; `depth` is the `max_depth` the converter gave `find_root`."""
    expected = "\n".join(f"  - {lay}" for lay in layouts)
    levels = {1: "one folder level", 2: "two folder levels", 3: "three folder levels"}.get(depth, f"{depth} levels")
    return ConversionError(
        f"{src} does not look like a {spec_title} download.\nExpected one of these layouts (searched up to "
        f"{levels} below --src):\n{expected}\nFound in {src}: {listing(src)}.\n{extra}"
        "Point --src at the folder that holds the extracted archives."
    )


def read_list_file(path: Path) -> list[str]:
    """Sample ids from a split list: one entry per line, first token, folder and extension stripped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConversionError(f"cannot read split list {path} ({e}).") from e
    ids = []
    for line in lines:
        token = line.strip().split()[0] if line.strip() and not line.lstrip().startswith("#") else ""
        if token:
            name = token.replace("\\", "/").rsplit("/", 1)[-1]
            ids.append(name.rsplit(".", 1)[0] if "." in name else name)
    if not ids:
        raise ConversionError(f"split list {path} is empty.")
    return ids


def split_list(kind: str, split: str, opts: Options, src: Path) -> tuple[list[str], str] | None:
    """Ids of `split` from --split-file, --split-dir or a `<kind>_split_<split>.txt` found under `src`."""
    names = [f"{kind}_split_{split}.txt", f"{split}.txt"]
    path: Path | None = None
    if split in opts.split_files:
        path = Path(opts.split_files[split])
    elif opts.split_dir is not None:
        path = next((Path(opts.split_dir) / n for n in names if (Path(opts.split_dir) / n).is_file()), None)
        if path is None:
            raise ConversionError(f"--split-dir {opts.split_dir} has none of {names}.")
    else:
        path = find_file(src, names[0])
    if path is None:
        return None
    return read_list_file(path), f"list {path}"


# ----- per-pair conversion (runs in the workers) ----------------------------------------------------------
@dataclass
class Job:
    decoder: Decoder
    out_dir: Path
    resize: int | None
    square: bool
    on_mismatch: str
    on_degenerate: str


_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job


def file_size(path: Path | None) -> int | None:
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def decode_image(data: bytes, path: Path) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConversionError(f"cannot decode image {path} ({e}): the file is truncated or corrupt. Re-extract it "
                              "from the archive (a partial download or a full disk is the usual cause) and rerun: "
                              "conversion resumes.") from e


def _resize_pair(rgb: np.ndarray, label: np.ndarray, short: int | None, square: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resize and crop one pair; the label always with nearest neighbour.

    Without `square`: resize so the short side is `short`, image bilinear, sizes rounded.
    With `square` (the Mapillary evaluation of RobustNet and Pin the Memory, done exactly as their
    ResizeHeight + CenterCropPad): resize so the *height* is `short` and the width `int(w / h * short)`
    (truncated), image bicubic; then cut a `short` x `short` square at column `round((w' - short) / 2)`
    (Python rounding). Every image at least as wide as tall gets the same pixels as RobustNet. A
    narrower one (portrait) is padded to the square, centred, image 0 and label 255: RobustNet pads it
    with label 0 (road) and off centre, a bug not reproduced. `square` without `short` cuts the
    central square of the native image.
    """
    h, w = label.shape
    if square:
        if short and (size := (max(1, int(w / h * short)), short)) != (w, h):
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
            label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
        h, w = label.shape
        s = short or min(h, w)
        if w < s or h < s:
            top, left = max(s - h, 0) // 2, max(s - w, 0) // 2
            canvas_rgb = np.zeros((max(h, s), max(w, s), 3), rgb.dtype)
            canvas_label = np.full((max(h, s), max(w, s)), IGNORE_INDEX, label.dtype)
            canvas_rgb[top : top + h, left : left + w], canvas_label[top : top + h, left : left + w] = rgb, label
            rgb, label = canvas_rgb, canvas_label
            h, w = label.shape
        top, left = int(round((h - s) / 2)), int(round((w - s) / 2))
        return (np.ascontiguousarray(rgb[top : top + s, left : left + s]),
                np.ascontiguousarray(label[top : top + s, left : left + s]))
    if short and min(h, w) != short:
        scale = short / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return np.ascontiguousarray(rgb), np.ascontiguousarray(label)


def _encode_image(rgb: np.ndarray, jpeg: bool) -> bytes:
    if not jpeg:
        return encode_png(rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _convert(pair: Pair, job: Job) -> dict[str, Any]:
    assert pair.image is not None and pair.label is not None
    data = pair.image.read_bytes()
    image = decode_image(data, pair.image)
    label = job.decoder(pair.label)
    w, h = image.size
    if label.shape != (h, w):
        msg = (f"size mismatch: image {pair.image} is {w}x{h} but label {pair.label} is "
               f"{label.shape[1]}x{label.shape[0]} (WxH)")
        if job.on_mismatch == "drop":
            return {"status": "excluded", "reason": msg}
        if job.on_mismatch == "error":
            raise ConversionError(msg + ". Rerun with --on-mismatch drop to skip such pairs (what the DG papers do "
                                  "for GTAV) or --on-mismatch resize to resize the label to the image (nearest).")
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    rgb = np.asarray(image.convert("RGB"))
    std = float(rgb[::4, ::4].std())
    degenerate = f"single-colour image (pixel std {std:.2f})" if std < DEGENERATE_STD else None
    if degenerate and job.on_degenerate == "drop":
        return {"status": "excluded", "reason": degenerate}
    jpeg = pair.image.suffix.lower() in (".jpg", ".jpeg")
    if job.resize or job.square:
        rgb, label = _resize_pair(rgb, label, job.resize, job.square)
        data = _encode_image(rgb, jpeg)
    counts = np.bincount(label.ravel(), minlength=256)
    if counts[NUM_CLASSES:IGNORE_INDEX].any():  # a decoder bug, never a data problem
        raise ConversionError(f"internal error: decoded {pair.label} holds non-train ids")
    if not counts[:NUM_CLASSES].any():
        degenerate = degenerate or "label has no valid pixel (all ignore)"
    image_name, label_name = pair.id + (".jpg" if jpeg else ".png"), pair.id + ".png"
    label_png = encode_png(label)
    atomic_write_bytes(job.out_dir / "images" / image_name, data)
    atomic_write_bytes(job.out_dir / "labels" / label_name, label_png)
    return {
        "status": "ok", "image": image_name, "label": label_name, "bytes": [len(data), len(label_png)],
        "size": [label.shape[1], label.shape[0]], "native_size": [w, h],
        "pixels": [*counts[:NUM_CLASSES].tolist(), int(counts[IGNORE_INDEX])], "degenerate": degenerate,
    }


def convert_pair(pair: Pair) -> dict[str, Any]:
    """Convert one pair with the worker's job; failures come back as records, never as exceptions."""
    rec: dict[str, Any] = {"id": pair.id, "src_bytes": [file_size(pair.image), file_size(pair.label)]}
    try:
        rec.update(_convert(pair, _JOB))
    except ConversionError as e:
        rec.update(status="error", error=str(e))
    except Exception as e:  # noqa: BLE001 - one bad file must not kill the pool; reported with its path
        rec.update(status="error", error=f"{pair.image}: unexpected {type(e).__name__}: {e}")
    return rec


def run_pool(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, initializer: Callable[..., None],
             initargs: tuple, desc: str, progress: bool = True) -> Iterator[Any]:
    """fn over items in order, in `workers` processes (inline when 1), with a tqdm bar."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(items) < 2:
            initializer(*initargs)
            for item in items:
                yield fn(item)
                bar.update()
        else:
            chunk = max(1, min(32, len(items) // (workers * 4)))
            pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs)
            try:
                for result in pool.map(fn, items, chunksize=chunk):
                    yield result
                    bar.update()
            except BaseException:  # Ctrl-C or an abandoned generator: drop the queued work, do not drain it
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()


# ----- resume --------------------------------------------------------------------------------------------
class Progress:
    """Append-only record of finished pairs (`.progress.jsonl`), valid for one options fingerprint."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.records = path, {}
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and self._header(lines[0]) == fingerprint:
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                    self.records[rec["id"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by an interruption: that pair is simply redone
        else:
            atomic_write_bytes(path, (json.dumps({"fingerprint": fingerprint}) + "\n").encode())
        self._fh = open(path, "a")

    @staticmethod
    def _header(line: str) -> str | None:
        try:
            return json.loads(line).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            return None

    def finished(self, pair: Pair, split_dir: Path) -> dict[str, Any] | None:
        """The record of `pair` if its sources are unchanged and its outputs exist with the recorded sizes."""
        rec = self.records.get(pair.id)
        if rec is None or rec.get("src_bytes") != [file_size(pair.image), file_size(pair.label)]:
            return None
        if rec["status"] == "ok" and (file_size(split_dir / "images" / rec["image"]) != rec["bytes"][0]
                                      or file_size(split_dir / "labels" / rec["label"]) != rec["bytes"][1]):
            return None
        return rec

    def add(self, rec: dict[str, Any]) -> None:
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        self.records[rec["id"]] = rec

    def close(self) -> None:
        self._fh.close()


# ----- manifest and meta ---------------------------------------------------------------------------------
def build_manifest(dataset: str, kind: str, layout: Layout, plan: SplitPlan, mapping: str,
                   records: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """Counts, sizes, class pixel frequencies, orphans, exclusions and errors of one converted split."""
    ok = [r for r in records if r["status"] == "ok"]
    pixels = np.array([r["pixels"] for r in ok], dtype=np.int64).reshape(-1, NUM_CLASSES + 1)
    class_pixels = pixels[:, :NUM_CLASSES].sum(0)
    labelled = max(int(class_pixels.sum()), 1)
    errors = [{"id": r["id"], "error": r["error"]} for r in records if r["status"] == "error"]
    return {
        "dataset": dataset, "split": plan.name, "source": kind, "layout": layout.variant,
        "selection": plan.selection, "mapping": mapping, "complete": not errors,
        "count": len(ok), "expected_count": plan.expected,
        "image_sizes": dict(Counter("{}x{}".format(*r["size"]) for r in ok).most_common()),
        "native_image_sizes": dict(Counter("{}x{}".format(*r["native_size"]) for r in ok).most_common()),
        "class_names": list(CLASSES),
        "class_pixels": class_pixels.tolist(),
        "ignore_pixels": int(pixels[:, NUM_CLASSES].sum()),
        "class_frequency": [round(float(c) / labelled, 8) for c in class_pixels],
        "class_images": (pixels[:, :NUM_CLASSES] > 0).sum(0).tolist(),
        "orphans": [{"id": p.id, "missing": p.missing, "image": str(p.image or ""), "label": str(p.label or "")}
                    for p in plan.orphans],
        "excluded": plan.excluded + [{"id": r["id"], "reason": r["reason"]} for r in records
                                     if r["status"] == "excluded"],
        "degenerate": [{"id": r["id"], "reason": r["reason"], "action": "dropped"} for r in records
                       if r["status"] == "excluded" and r["reason"].startswith("single-colour")]
        + [{"id": r["id"], "reason": r["degenerate"], "action": "kept"} for r in ok if r.get("degenerate")],
        "errors": errors,
        "options": options,
        "items": {r["id"]: {"image": r["image"], "label": r["label"], "bytes": r["bytes"], "size": r["size"]}
                  for r in ok},
    }


def write_meta(ds_dir: Path, name: str, spec: DatasetSpec, layout: Layout, mapping: str,
               opts: Options) -> dict[str, Any]:
    """meta.json from every complete split manifest in `ds_dir`; written last."""
    manifests = {}
    for path in sorted(ds_dir.glob("*/manifest.json")):
        m = json.loads(path.read_text())
        if m.get("complete") and m.get("source") == spec.kind:
            manifests[path.parent.name] = m
    pixels = np.sum([m["class_pixels"] for m in manifests.values()], axis=0) if manifests else np.zeros(NUM_CLASSES)
    sizes: Counter[str] = Counter()
    for m in manifests.values():
        sizes.update(m["image_sizes"])
    w, h = (int(v) for v in sizes.most_common(1)[0][0].split("x")) if sizes else (0, 0)
    meta = {
        "name": name, "domain": name, "role": "real",
        "description": f"{spec.title}, converted by data_tools from the native download ({layout.variant} layout)",
        "protocol": spec.protocol, "source": spec.kind, "layout": layout.variant, "mapping": mapping,
        "splits": {s: m["count"] for s, m in manifests.items()},
        "classes_present": [i for i in range(NUM_CLASSES) if pixels[i] > 0],
        "image_size": [h, w], "resize_short_side": opts.resize, "square_crop": opts.square,
        **({"square_rule": SQUARE_RULE} if opts.square else {}),
        "made_by": "python -m data_tools convert", "converter_version": CONVERTER_VERSION,
    }
    if opts.limit is not None:
        meta["trial_limit"] = opts.limit  # a --limit trial: the first N pairs of each split only
    atomic_write_json(ds_dir / "meta.json", meta)
    return meta


# ----- the driver ----------------------------------------------------------------------------------------
def _policies(spec: DatasetSpec, opts: Options) -> tuple[str, str]:
    mismatch, degenerate = opts.on_mismatch or spec.on_mismatch, opts.on_degenerate or spec.on_degenerate
    if mismatch not in MISMATCH_POLICIES or degenerate not in DEGENERATE_POLICIES:
        raise ConversionError(f"--on-mismatch must be one of {MISMATCH_POLICIES} and --on-degenerate one of "
                              f"{DEGENERATE_POLICIES}; got {mismatch!r}, {degenerate!r}.")
    return mismatch, degenerate


def _orphan_error(plans: list[SplitPlan]) -> ConversionError:
    lines = []
    for plan in plans:
        for p in plan.orphans[:5]:
            have = p.image or p.label
            lines.append(f"  {plan.name}/{p.id}: missing {p.missing}" + (f" (found {have})" if have else ""))
        if len(plan.orphans) > 5:
            lines.append(f"  {plan.name}: ... {len(plan.orphans) - 5} more")
    total = sum(len(p.orphans) for p in plans)
    return ConversionError(
        f"{total} sample(s) have an image without a label or a label without an image:\n" + "\n".join(lines)
        + "\nThis usually means an archive part was not downloaded or extracted completely: re-extract it. "
        "To convert the complete pairs only (orphans are listed in each manifest), rerun with --allow-orphans."
    )


def convert_split(spec: DatasetSpec, layout: Layout, plan: SplitPlan, decoder: Decoder, ds_dir: Path,
                  name: str, opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    """Convert one planned split (resuming), clean stale outputs, write its manifest; return the manifest."""
    mismatch, degenerate = _policies(spec, opts)
    split_dir = ds_dir / plan.name
    options = {"resize": opts.resize, "square": opts.square, "on_mismatch": mismatch, "on_degenerate": degenerate,
               "unknown_ids": opts.unknown_ids, "limit": opts.limit}
    fingerprint = hashlib.sha256(json.dumps(
        {"v": CONVERTER_VERSION, "kind": spec.kind, "layout": layout.variant, "mapping": getattr(decoder, "name", ""),
         **{k: v for k, v in options.items() if k != "limit"},
         **({"square_rule": SQUARE_RULE} if opts.square else {})}, sort_keys=True).encode()).hexdigest()[:16]
    split_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(split_dir / ".progress.jsonl", fingerprint)
    pairs = plan.pairs[: opts.limit] if opts.limit else plan.pairs
    done = {p.id: rec for p in pairs if (rec := progress.finished(p, split_dir)) is not None}
    todo = [p for p in pairs if p.id not in done]
    job = Job(decoder, split_dir, opts.resize, opts.square, mismatch, degenerate)
    try:
        for rec in run_pool(convert_pair, todo, opts.workers, _init_worker, (job,), f"{name}/{plan.name}",
                            opts.progress):
            done[rec["id"]] = rec
            if rec["status"] != "error":
                progress.add(rec)
    finally:
        progress.close()
    records = [done[p.id] for p in pairs]
    removed = _remove_stale(split_dir, records)
    manifest = build_manifest(name, spec.kind, layout, plan, getattr(decoder, "name", ""), records, options)
    atomic_write_json(split_dir / "manifest.json", manifest)
    n_excl = sum(r["status"] == "excluded" for r in records)
    log(f"  {plan.name}: {manifest['count']} converted ({len(pairs) - len(todo)} already done, skipped), "
        f"{n_excl} excluded, {len(manifest['errors'])} failed"
        + (f", {removed} stale file(s) removed" if removed else "") + f" -> {split_dir}")
    return manifest


def _remove_stale(split_dir: Path, records: list[dict[str, Any]]) -> int:
    """Delete outputs of samples that are no longer part of the split (and leftover temporary files)."""
    keep = {"images": {r["image"] for r in records if r["status"] == "ok"},
            "labels": {r["label"] for r in records if r["status"] == "ok"}}
    failed = {r["id"] for r in records if r["status"] == "error"}  # a rerun fixes them: keep what they had
    removed = 0
    for sub, names in keep.items():
        folder = split_dir / sub
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name not in names and f.stem not in failed:
                    f.unlink()
                    removed += 1
    return removed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); delete it and rerun the same command "
                              "(finished files are skipped).") from e


def check_destination(dst: Path) -> None:
    """--dst must be a folder (or not exist yet); a file there is an error before anything is read."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"--dst {dst} is a file, not a folder; give the data root folder (datasets go to "
                              "DST/<name>/).")


def check_trial(ds_dir: Path, plans: list[SplitPlan], limit: int) -> None:
    """A --limit trial keeps only its first `limit` pairs per split, so it may not run where other converted
    files exist: the stale-file pass would delete them. Such files are never deleted by a trial."""
    if limit < 1:
        raise ConversionError(f"--limit {limit} is invalid: give the number of pairs per split to convert, >= 1.")
    for plan in plans:
        split_dir = ds_dir / plan.name
        keep = {p.id for p in plan.pairs[:limit]}
        other = sorted({f.stem for sub in ("images", "labels") if (split_dir / sub).is_dir()
                        for f in (split_dir / sub).iterdir() if not f.name.startswith(".")} - keep)
        if other:
            raise ConversionError(
                f"{split_dir} already holds {len(other)} converted pair(s) beyond the first {limit} (e.g. "
                f"'{other[0]}'); a --limit {limit} trial there would delete them. Write the trial elsewhere "
                f"(--name {ds_dir.name}_trial or another --dst), or drop --limit to (re)convert the whole split.")


def resolve_splits(spec: DatasetSpec, opts: Options) -> list[str]:
    splits = list(opts.splits or spec.default_splits)
    bad = [s for s in splits if s not in spec.splits]
    if bad or not splits:
        raise ConversionError(f"{spec.kind} has no split {bad or splits}; choose from {list(spec.splits)}.")
    return list(dict.fromkeys(splits))


def convert(kind: str, src: str | Path, dst: str | Path, opts: Options | None = None,
            log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Convert the native download of `kind` at `src` into `<dst>/<name>/` (see module docstring).

    Returns the manifest of every converted split. Raises ConversionError on a wrong layout, orphans
    (unless allowed), or any file that failed; meta.json is then not written, and a rerun resumes."""
    from . import get_spec

    opts = opts or Options()
    spec = get_spec(kind)
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a folder. Download and extract {spec.title} there first "
                              "(see the README, 'Real datasets').")
    check_destination(dst)
    _policies(spec, opts)
    layout = spec.detect(src, opts)
    log(f"{spec.kind}: detected layout '{layout.variant}' at {layout.root}\n  {layout.description}")
    decoder = spec.decoder(layout, opts)
    log(f"  labels: {getattr(decoder, 'name', decoder)}")
    requested = resolve_splits(spec, opts)
    plans = [spec.plan(layout, s, opts) for s in requested]
    if "all" in requested and len(requested) > 1:
        inside = [s for s in requested if s != "all"]
        log(f"  note: 'all' (written as train) contains the {'/'.join(inside)} samples too, so {'/'.join(inside)} is "
            "not held out: use it to watch the fit, not as a score (convert train,val under another --name for "
            "disjoint splits)")
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConversionError(f"splits {list(opts.splits or [])} write the same output folder twice ({names}); "
                              "'all' is written as 'train', so convert it under another --name.")
    for plan in plans:
        expected = f", expected {plan.expected}" if plan.expected is not None else ""
        log(f"  {plan.name}: {len(plan.pairs)} pairs ({plan.selection}{expected}); "
            f"{len(plan.orphans)} orphan(s); {len(plan.excluded)} excluded by rule")
    if any(p.orphans for p in plans) and not opts.allow_orphans:
        raise _orphan_error(plans)
    if opts.dry_run:
        return {}
    name = spec.output_name(opts)
    ds_dir = dst / name
    if opts.limit is not None:
        check_trial(ds_dir, plans, opts.limit)
    old_meta = ds_dir / "meta.json"
    if old_meta.is_file():
        old = _read_json(old_meta)
        if old.get("source") not in (None, spec.kind):
            raise ConversionError(f"{ds_dir} holds a converted '{old.get('source')}' dataset; refusing to mix "
                                  f"{spec.kind} into it. Choose another --name or delete that folder.")
        old_meta.unlink()  # the dataset is incomplete until this run ends cleanly
    manifests = {p.name: convert_split(spec, layout, p, decoder, ds_dir, name, opts, log) for p in plans}
    failed = [(s, e) for s, m in manifests.items() for e in m["errors"]]
    if failed:
        shown = "\n".join(f"  {s}/{e['id']}: {e['error']}" for s, e in failed[:10])
        more = f"\n  ... and {len(failed) - 10} more (see the manifests)" if len(failed) > 10 else ""
        raise ConversionError(f"{len(failed)} file(s) could not be converted; meta.json was not written:\n{shown}{more}"
                              "\nFix or re-extract these files and rerun the same command: finished files are "
                              "skipped.")
    meta = write_meta(ds_dir, name, spec, layout, getattr(decoder, "name", ""), opts)
    log(f"wrote {ds_dir}: splits {meta['splits']}, protocol {meta['protocol']}. "
        f"Check it with: python -m data_tools verify {ds_dir}")
    return manifests
