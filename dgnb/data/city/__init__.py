"""The embedded multi-domain city: procedural street scenes in the 19 Cityscapes train ids.

Content (the layout: label map and depth) is drawn from (seed, split, index) and the domain's
geometric knobs; appearance from the domain's style knobs. The same layout can therefore be
rendered in every domain (paired renders), and a new domain is one line:

    >>> from dgnb.data.city import Domain, render
    >>> dusk = Domain("dusk", "dim warm light with light fog", knobs={"brightness": -2, "cast": 2, "fog": 1})
    >>> sample = render(dusk, "val", 0)          # .image (H, W, 3) uint8, .label (H, W) uint8, .depth

`ensure_city(root, ...)` writes domains to the common on-disk layout (resumable, atomic, meta.json
last) so the same `SegFolder` reads generated and real data.
"""

from __future__ import annotations

import hashlib
import inspect
import numbers
import os
import shutil
import zlib
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ...io import atomic_save_png, atomic_write_json
from .layout import Camera, Layout
from .scene import sample_layout
from .style import KNOBS, MATERIALS, Domain, Knob, check_knobs, render_image

GENERATOR_VERSION = 1

_SOURCE_STYLE = {"cast": 2, "saturation": 1.5, "brightness": 0.5, "palette": 1}
DOMAINS: dict[str, Domain] = {d.name: d for d in [
    Domain("source_a", "sunny and vivid: warm white balance, saturated colours (a GTAV-like world)", "source",
           _SOURCE_STYLE),
    Domain("source_b", "pale and cool: bluish white balance, washed-out colours, coarser textures (SYNTHIA-like)",
           "source", {"cast": -2, "saturation": -1.5, "brightness": 0.8, "contrast": 1, "texture_scale": -1.5,
                      "palette": 1}),
    Domain("source_c", "overcast and dim: darker, low contrast, slight green tint, a little sensor noise", "source",
           {"brightness": -1.5, "contrast": 2, "hue": -1, "noise": 1, "palette": 1}),
    Domain("near", "a new city in the sources' range of styles: mixed white balance and contrast, its own "
           "palette variation, slight blur", "near",
           {"cast": 1, "saturation": -0.5, "contrast": 2.5, "hue": 0.75, "texture_scale": 0.5, "palette": 2, "blur": 1,
            "noise": 1.5}, palette_seed=zlib.crc32(b"near_a")),  # the calibration probe's palette draw (README)
    Domain("far_texture", "unseen materials and hues: new texture families, hues rotated by 50 degrees", "far",
           {"texture": 5, "hue": 3, "palette": 2, "saturation": 1}),
    Domain("far_fog", "fog: depth-dependent haze (beta = 0.023 / m) in a cool light", "far",
           {"fog": 2.5, "cast": -1}),
    Domain("geometric", "source_a's style seen from a high, tilted camera on denser streets (a geometric "
           "control that style methods should not fix)", "geometric",
           {**_SOURCE_STYLE, "camera_height": 4, "pitch": 3, "density": 2}, palette_seed=zlib.crc32(b"source_a")),
]}


@dataclass
class RenderResult:
    image: np.ndarray   # (H, W, 3) uint8
    label: np.ndarray   # (H, W) uint8 train ids
    depth: np.ndarray   # (H, W) float32 metres
    layout: Layout


def get_domain(domain: str | Domain) -> Domain:
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain '{domain}'; built-in domains: {sorted(DOMAINS)} "
                         "(or pass a Domain(name, description, knobs={...}))")
    return DOMAINS[domain]


def _code(text: str) -> int:
    return zlib.crc32(text.encode())


def camera_for(domain: Domain, size: tuple[int, int]) -> Camera:
    return Camera(size[0], size[1], cam_height=1.6 * 2.0 ** domain.value("camera_height"),
                  pitch_deg=3.0 + domain.value("pitch"))


SPLITS = ("train", "val", "test")
MAX_SEED = 2**63 - 1


def check_render_args(split: str, index: int, seed: int, size: Sequence[int]) -> None:
    """Raise ValueError naming the argument, its value and the valid range (a typo must not give another dataset)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of the city; choose one of {', '.join(SPLITS)}")
    for name, value, hi in (("index", index, None), ("seed", seed, MAX_SEED)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0 or (hi and value > hi):
            span = f"[0, {hi}]" if hi else ">= 0"
            raise ValueError(f"{name}={value!r} is invalid: the image {name} must be an integer {span}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 16 for v in size)):
        raise ValueError(f"size={size!r} is invalid: expected (height, width), two integers >= 16")


def render(domain: str | Domain, split: str, index: int, seed: int = 0, size: tuple[int, int] = (128, 256)) -> RenderResult:
    """Render image `index` of `split` in `domain`: a pure function of its arguments."""
    check_render_args(split, index, seed, size)
    dom = get_domain(domain)
    layout_rng = np.random.default_rng([seed, _code(split), index])
    lay = sample_layout(layout_rng, camera_for(dom, size), density=2.0 ** dom.value("density"))
    style_rng = np.random.default_rng([seed, _code(split), index, _code(dom.name)])
    return RenderResult(render_image(lay, dom, style_rng), lay.label, lay.depth, lay)


def sweep(domain: str | Domain, knob: str, severities: Iterable[float] = range(6), split: str = "val",
          index: int = 0, seed: int = 0, size: tuple[int, int] = (128, 256)) -> list[RenderResult]:
    """The same layout rendered in `domain` with `knob` at each severity."""
    check_knobs({knob: 0})
    severities = list(severities)
    for s in severities:  # every severity before the first render
        check_knobs({knob: s})
    check_render_args(split, index, seed, size)
    dom = get_domain(domain)
    return [render(dom.with_knobs(**{knob: s}), split, index, seed, size) for s in severities]


# ----- writing to disk ---------------------------------------------------------------------------
def _write_one(args: tuple[Domain, str, int, int, tuple[int, int], str]) -> None:
    dom, split, index, seed, size, folder = args
    r = render(dom, split, index, seed, size)
    name = f"{index:05d}.png"
    atomic_save_png(Path(folder) / split / "labels" / name, r.label, fsync=False)
    atomic_save_png(Path(folder) / split / "images" / name, r.image, fsync=False)  # image last: it marks done


@lru_cache(maxsize=None)
def generator_fingerprint() -> str:
    """Identity of the generator code: a hash of GENERATOR_VERSION, the layout, scene and style modules and the
    render functions (as the run key hashes the library). Data written by other code is regenerated."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(str(GENERATOR_VERSION).encode())
    for name in ("layout.py", "scene.py", "style.py"):
        h.update((here / name).read_bytes())
    for fn in (_code, camera_for, render):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def _settings(dom: Domain, size: Sequence[int], seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "size": list(size), "seed": seed, "knobs": dom.knobs,
            "palette_seed": dom.palette_seed, "code": generator_fingerprint()}


_IDENTITY = ("version", "code")  # settings that name the generator, not the request


@contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Serialize generation under `root` across processes (concurrent runs wait instead of racing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (atomic writes still keep every file whole)
        yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(root / ".generate.lock", "a")
    except PermissionError:  # a read-only root: fine while nothing is missing; a write below names the folder
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_old_meta(meta_path: Path) -> dict | None:
    import json

    if not meta_path.is_file():
        return None
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None  # a torn or hand-edited meta.json: the folder is rescanned and meta.json rewritten


def _discard(folder: Path, progress: bool) -> None:
    """Remove a domain folder written by other generator code: rename first, so an interruption never leaves
    old images under the real name."""
    if progress:
        print(f"{folder}: written by other generator code (identity changed); regenerating it")
    trash = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _present(folder: Path, split: str) -> set[str]:
    """Ids whose image and label both exist (the image is written last, but a user may delete either)."""
    images, labels = folder / split / "images", folder / split / "labels"
    if not images.is_dir() or not labels.is_dir():
        return set()
    return {p.stem for p in images.glob("*.png")} & {p.stem for p in labels.glob("*.png")}


def ensure_city(root: str | Path, domains: Sequence[str | Domain] | None = None, splits: dict[str, int] | None = None,
                size: Sequence[int] = (128, 256), seed: int = 0, progress: bool = True,
                workers: int | None = None) -> list[Path]:
    """Generate whatever is missing of `domains` x `splits` under `root` (common layout).

    Resumable and self-healing: every image id up to the split size recorded in `meta.json` (or requested)
    whose image or label is missing is (re)generated, so a folder always agrees with its meta.json. Files
    are written atomically, the image after its label; `meta.json` is (re)written last, recording the
    generator settings, the generator code's identity and the split sizes. A folder written by other
    generator code is regenerated; one generated with other settings (size, seed, knobs) is an error.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    splits = splits or {"train": 600, "val": 150}
    doms = [get_domain(d) for d in (domains or list(DOMAINS))]
    size = tuple(size)
    for split, count in splits.items():
        check_render_args(split, 0, seed, size)
        if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
            raise ValueError(f"splits[{split!r}]={count!r} is invalid: the number of images must be an integer >= 1")
    size = tuple(int(s) for s in size)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"data root {root} is a file, not a folder; point it (--root, --data-root, "
                                 "data.root) at a folder")
    todo: list[tuple] = []
    metas: dict[Path, dict] = {}
    with _generation_lock(root):
        for dom in doms:
            folder = root / dom.name
            settings = _settings(dom, size, seed)
            meta = {"name": dom.name, "role": dom.role, "description": dom.description,
                    "origin": "dgnb procedural city", "image_size": list(size), "generator": settings, "splits": {}}
            old = _read_old_meta(folder / "meta.json")
            if old is not None:
                before = old.get("generator") or {}
                request = {k: v for k, v in settings.items() if k not in _IDENTITY}
                if {k: v for k, v in before.items() if k not in _IDENTITY} != request:
                    raise ValueError(
                        f"{folder} was generated with other settings ({before}) than requested ({settings}); "
                        f"delete that folder to regenerate it, or use another data root")
                if any(before.get(k) != settings[k] for k in _IDENTITY):
                    _discard(folder, progress)
                else:
                    meta["splits"] = dict(old.get("splits", {}))
            for split, count in splits.items():
                count = max(count, int(meta["splits"].get(split, 0)))
                have = _present(folder, split)
                todo += [(dom, split, i, seed, size, str(folder)) for i in range(count) if f"{i:05d}" not in have]
                meta["splits"][split] = count
            metas[folder] = meta
        if todo:
            workers = workers or min(len(os.sched_getaffinity(0)), 8)
            with tqdm(total=len(todo), desc="generating city", disable=not progress, unit="img") as bar:
                if workers > 1 and len(todo) > 64:
                    import multiprocessing as mp

                    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                        for _ in pool.map(_write_one, todo, chunksize=16):
                            bar.update()
                else:
                    for item in todo:
                        _write_one(item)
                        bar.update()
        for folder, meta in metas.items():
            if _read_old_meta(folder / "meta.json") != meta:
                atomic_write_json(folder / "meta.json", meta)
    return list(metas)


generate = ensure_city

__all__ = ["DOMAINS", "KNOBS", "MATERIALS", "Domain", "Knob", "RenderResult", "camera_for", "ensure_city", "generate",
           "get_domain", "render", "sweep", "GENERATOR_VERSION", "SPLITS", "generator_fingerprint"]
