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

import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

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


def render(domain: str | Domain, split: str, index: int, seed: int = 0, size: tuple[int, int] = (128, 256)) -> RenderResult:
    """Render image `index` of `split` in `domain`: a pure function of its arguments."""
    dom = get_domain(domain)
    layout_rng = np.random.default_rng([seed, _code(split), index])
    lay = sample_layout(layout_rng, camera_for(dom, size), density=2.0 ** dom.value("density"))
    style_rng = np.random.default_rng([seed, _code(split), index, _code(dom.name)])
    return RenderResult(render_image(lay, dom, style_rng), lay.label, lay.depth, lay)


def sweep(domain: str | Domain, knob: str, severities: Iterable[float] = range(6), split: str = "val",
          index: int = 0, seed: int = 0, size: tuple[int, int] = (128, 256)) -> list[RenderResult]:
    """The same layout rendered in `domain` with `knob` at each severity."""
    check_knobs({knob: 0})
    dom = get_domain(domain)
    return [render(dom.with_knobs(**{knob: s}), split, index, seed, size) for s in severities]


# ----- writing to disk ---------------------------------------------------------------------------
def _write_one(args: tuple[Domain, str, int, int, tuple[int, int], str]) -> None:
    dom, split, index, seed, size, folder = args
    r = render(dom, split, index, seed, size)
    name = f"{index:05d}.png"
    atomic_save_png(Path(folder) / split / "labels" / name, r.label, fsync=False)
    atomic_save_png(Path(folder) / split / "images" / name, r.image, fsync=False)  # image last: it marks done


def _settings(dom: Domain, size: Sequence[int], seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "size": list(size), "seed": seed, "knobs": dom.knobs,
            "palette_seed": dom.palette_seed}


def ensure_city(root: str | Path, domains: Sequence[str | Domain] | None = None, splits: dict[str, int] | None = None,
                size: Sequence[int] = (128, 256), seed: int = 0, progress: bool = True,
                workers: int | None = None) -> list[Path]:
    """Generate whatever is missing of `domains` x `splits` under `root` (common layout).

    Resumable: an image whose PNG exists is skipped (files are written atomically, the image after
    its label). `meta.json` is (re)written last, recording the generator settings and the split sizes.
    A folder generated with other settings is an error (delete it or choose another root).
    """
    from tqdm.auto import tqdm

    root = Path(root)
    splits = splits or {"train": 600, "val": 150}
    doms = [get_domain(d) for d in (domains or list(DOMAINS))]
    size = tuple(int(s) for s in size)
    todo: list[tuple] = []
    metas: dict[Path, dict] = {}
    for dom in doms:
        folder = root / dom.name
        meta_path = folder / "meta.json"
        settings = _settings(dom, size, seed)
        meta = {"name": dom.name, "role": dom.role, "description": dom.description, "origin": "dgnb procedural city",
                "image_size": list(size), "generator": settings, "splits": {}}
        if meta_path.is_file():
            import json

            old = json.loads(meta_path.read_text())
            if old.get("generator") != settings:
                raise ValueError(
                    f"{folder} was generated with other settings ({old.get('generator')}) than requested ({settings}); "
                    f"delete that folder to regenerate it, or use another data root")
            meta["splits"] = dict(old.get("splits", {}))
        for split, count in splits.items():
            if meta["splits"].get(split, 0) >= count:
                continue
            have = {p.stem for p in (folder / split / "images").glob("*.png")} if (folder / split / "images").is_dir() else set()
            todo += [(dom, split, i, seed, size, str(folder)) for i in range(count) if f"{i:05d}" not in have]
            meta["splits"][split] = count
        metas[folder] = meta
    if todo:
        workers = workers or min(len(os.sched_getaffinity(0)), 8)
        bar = tqdm(total=len(todo), desc="generating city", disable=not progress, unit="img")
        if workers > 1 and len(todo) > 64:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for _ in pool.map(_write_one, todo, chunksize=16):
                    bar.update()
        else:
            for item in todo:
                _write_one(item)
                bar.update()
        bar.close()
    for folder, meta in metas.items():
        if not (folder / "meta.json").is_file() or todo:
            atomic_write_json(folder / "meta.json", meta)
    return list(metas)


generate = ensure_city

__all__ = ["DOMAINS", "KNOBS", "MATERIALS", "Domain", "Knob", "RenderResult", "camera_for", "ensure_city", "generate",
           "get_domain", "render", "sweep", "GENERATOR_VERSION"]
