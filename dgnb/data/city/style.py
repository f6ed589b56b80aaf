"""Appearance: shift knobs, domains, and rendering an RGB image from a layout.

A *knob* is one named axis of shift with severities 0..5 (signed knobs also take -5..0, the
opposite direction); fractional severities interpolate. A *domain* is a named set of knob
severities with a one-line description. Rendering applies, in this order (docs/city.md, 'Rendering'):

    content colour (shared base palette, per instance) -> parts (windows, wheels, lamps...)
    -> per-class palette perturbation -> texture family -> surface shading -> sky
    -> global photometric transforms (brightness, saturation, hue, colour cast, contrast)
    -> fog from depth (Koschmieder: I = J t + A (1 - t), t = exp(-beta Z)) -> night and lights
    -> sensor blur and noise.

Geometric knobs (camera height, pitch, object density) act on the layout, not here.
"""

from __future__ import annotations

import dataclasses
import numbers
import zlib
from dataclasses import dataclass, field

import numpy as np

from .layout import (BICYCLE, BUS, CAR, FACE_LEFT, FACE_RIGHT, FRONTAL, GROUND, LAMP, LEGS, LIGHT, MARKING,
                     MOTORCYCLE, SKIN, SKY, SKYSURF, TRUCK, TRUNK, WHEEL, WINDOW, Layout)
from .scene import BASE_RGB, SKIN_TONES


@dataclass(frozen=True)
class Knob:
    description: str
    levels: tuple[float, ...]   # parameter value at severity 0, 1, ..., 5
    signed: bool = False        # negative severities mirror the levels (opposite direction)
    geometric: bool = False     # acts on the layout (camera, density) rather than the appearance

    def value(self, severity: float) -> float:
        s = abs(severity)
        v = float(np.interp(s, np.arange(len(self.levels)), self.levels))
        if not self.signed:
            return v
        return v if severity >= 0 else -v


KNOBS: dict[str, Knob] = {
    "hue": Knob("rotation of all hues (degrees; changes channel covariance, a second-order shift)",
                (0, 15, 30, 50, 75, 110), signed=True),
    "saturation": Knob("colour saturation, log2 scale (+ vivid, - washed out)", (0, .3, .6, .9, 1.2, 1.5), signed=True),
    "contrast": Knob("contrast loss towards mid-grey (fraction kept)", (1, .85, .72, .6, .48, .36)),
    "cast": Knob("white balance: warm (+) or cool (-) colour cast", (0, .06, .12, .18, .25, .33), signed=True),
    "brightness": Knob("illumination, log2 gain (+ brighter, - darker)", (0, .25, .5, .75, 1.0, 1.3), signed=True),
    "palette": Knob("per-class colour perturbation around the shared base palette (std of log gain)",
                    (0, .05, .1, .15, .2, .26)),
    "texture": Knob("blend from the source texture families to unseen ones (stripes, waves, speckle...)",
                    (0, .2, .4, .6, .8, 1.0)),
    "texture_scale": Knob("texture frequency, log2 scale (+ finer, - coarser)", (0, .4, .8, 1.2, 1.6, 2.0), signed=True),
    "fog": Knob("fog density beta (1/m) with depth-dependent transmission", (0, .008, .016, .03, .05, .08)),
    "night": Knob("night: exposure loss, blue ambient, dark sky, lamps and lit windows", (0, .2, .4, .6, .8, 1.0)),
    "noise": Knob("sensor noise std (of [0, 1] intensities)", (0, .01, .02, .04, .06, .09)),
    "blur": Knob("defocus blur radius (pixels at 256 px width)", (0, .5, 1.0, 1.5, 2.0, 3.0)),
    "camera_height": Knob("camera height, log2 of metres / 1.6 (geometric)", (0, .32, .64, .96, 1.28, 1.6),
                          signed=True, geometric=True),
    "pitch": Knob("extra downward camera tilt (degrees, geometric)", (0, 2, 4, 6, 8, 10), signed=True, geometric=True),
    "density": Knob("object density, log2 multiplier (geometric)", (0, .4, .8, 1.2, 1.6, 2.0), signed=True,
                    geometric=True),
}


def check_knobs(knobs: dict[str, float]) -> None:
    for name, sev in knobs.items():
        if name not in KNOBS:
            raise ValueError(f"unknown knob '{name}'; valid knobs: {sorted(KNOBS)}")
        lo = -5 if KNOBS[name].signed else 0
        if not isinstance(sev, numbers.Real) or isinstance(sev, bool) or not lo <= float(sev) <= 5:
            raise ValueError(f"knob '{name}' severity {sev!r} is outside the valid range: a number in [{lo}, 5]")


@dataclass(frozen=True)
class Domain:
    """A named preset of knob severities. `role` is source, near, far, geometric (or anything you like)."""

    name: str
    description: str
    role: str = "custom"
    knobs: dict[str, float] = field(default_factory=dict)
    palette_seed: int | None = None  # seeds the per-class palette perturbation (default: from the name)

    def __post_init__(self) -> None:
        check_knobs(self.knobs)
        if self.palette_seed is None:
            object.__setattr__(self, "palette_seed", zlib.crc32(self.name.encode()))

    def with_knobs(self, **severities: float) -> "Domain":
        """The same domain with some knobs changed (same palette perturbation)."""
        return dataclasses.replace(self, knobs={**self.knobs, **severities})

    def value(self, knob: str) -> float:
        return KNOBS[knob].value(self.knobs.get(knob, 0.0))


# ----- textures ----------------------------------------------------------------------------------
def _periodic_noise(n: int, power: float, seed: int) -> np.ndarray:
    """A periodic n x n tile of 1/f^power noise, scaled to [-1, 1]."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / n) ** power
    tile = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * amp))
    tile -= tile.mean()
    return (tile / np.abs(tile).max()).astype(np.float32)


TILE = 128
_FINE = _periodic_noise(TILE, 0.5, 1)
_COARSE = _periodic_noise(TILE, 2.0, 2)


def _sample(tile: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return tile[(y.astype(np.int64)) % TILE, (x.astype(np.int64)) % TILE]


def texture(family: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture value in [-1, 1] at surface coordinates (u, v) in metres."""
    if family == "grain":
        return _sample(_FINE, u * 40, v * 40)
    if family == "smooth":
        return _sample(_COARSE, u * 6, v * 6)
    if family == "blotch":
        return np.sign(_sample(_COARSE, u * 10, v * 10)) * 0.6 + 0.4 * _sample(_FINE, u * 30, v * 30)
    if family == "bricks":
        row = np.floor(v / 0.25)
        uu = u + (row % 2) * 0.25
        mortar = ((uu / 0.5) % 1 < 0.08) | ((v / 0.25) % 1 < 0.12)
        cell = _sample(_FINE, np.floor(uu / 0.5) * 7, row * 13) * 0.5
        return np.where(mortar, -1.0, cell)
    if family == "tiles":
        grout = ((u / 0.6) % 1 < 0.06) | ((v / 0.6) % 1 < 0.06)
        return np.where(grout, -0.9, 0.3 * _sample(_FINE, u * 40, v * 40))
    if family == "stripes":
        return np.sin(2 * np.pi * v / 0.35).astype(np.float32)
    if family == "waves":
        return np.sin(2 * np.pi * (u + 0.8 * _sample(_COARSE, u * 4, v * 4)) / 0.6).astype(np.float32)
    if family == "checker":
        return ((np.floor(u / 0.5) + np.floor(v / 0.5)) % 2 * 2 - 1).astype(np.float32)
    if family == "speckle":
        return np.where(_sample(_FINE, u * 25, v * 25) > 0.35, 1.0, -0.3).astype(np.float32)
    raise ValueError(f"unknown texture family '{family}'")


# class -> (source family, unseen family, amplitude)
MATERIALS: dict[int, tuple[str, str, float]] = {
    0: ("grain", "waves", 0.18), 1: ("tiles", "speckle", 0.2), 2: ("bricks", "stripes", 0.22), 3: ("smooth", "checker", 0.2),
    4: ("stripes", "checker", 0.3), 5: ("smooth", "grain", 0.15), 6: ("smooth", "grain", 0.1), 7: ("smooth", "grain", 0.1),
    8: ("blotch", "waves", 0.35), 9: ("grain", "bricks", 0.3), 10: ("smooth", "stripes", 0.08),
    11: ("smooth", "grain", 0.15), 12: ("smooth", "grain", 0.15), 13: ("smooth", "speckle", 0.12),
    14: ("smooth", "speckle", 0.12), 15: ("smooth", "speckle", 0.12), 16: ("smooth", "speckle", 0.12),
    17: ("smooth", "grain", 0.12), 18: ("smooth", "grain", 0.12),
}


def _texture_map(lay: Layout, blend: float, scale: float, offset: np.ndarray) -> np.ndarray:
    """Per-pixel texture modulation (1 + amp_c T_c), T blended between the source and unseen family."""
    u = lay.tu * scale + offset[0]
    v = lay.tv * scale + offset[1]
    mod = np.ones(lay.label.shape, np.float32)
    for cls in np.unique(lay.label):
        src, unseen, amp = MATERIALS[int(cls)]
        m = lay.label == cls
        t = texture(src, u[m], v[m]) if blend < 1 else 0.0
        if blend > 0:
            t = (1 - blend) * t + blend * texture(unseen, u[m], v[m])
        mod[m] = 1 + amp * t
    return mod


# ----- colour helpers ----------------------------------------------------------------------------
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def hue_matrix(degrees: float) -> np.ndarray:
    """3x3 RGB matrix rotating the chroma plane (I, Q) of YIQ by `degrees`, keeping luma."""
    a = np.radians(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], np.float32)
    return _YIQ2RGB @ rot @ _RGB2YIQ


def class_gains(domain: Domain) -> np.ndarray:
    """(256, 3) per-class multiplicative RGB gains: the domain's perturbation of the shared palette."""
    rng = np.random.default_rng(domain.palette_seed)
    g = np.ones((256, 3), np.float32)
    g[:19] = np.exp(rng.normal(0, 1, (19, 3)) * domain.value("palette"))
    return g


def box_blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Approximately Gaussian blur (three box passes per axis), vectorised with cumulative sums."""
    r = int(round(radius))
    if r < 1:
        if radius <= 0:
            return img
        k = radius  # sub-pixel: blend with the 3-tap average
        avg = (np.roll(img, 1, 0) + img + np.roll(img, -1, 0)) / 3
        avg = (np.roll(avg, 1, 1) + avg + np.roll(avg, -1, 1)) / 3
        return (1 - k) * img + k * avg
    out = img
    for axis in (0, 1):
        for _ in range(3):
            pad = [(0, 0)] * out.ndim
            pad[axis] = (r + 1, r)
            c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
            n = out.shape[axis]
            out = (np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis) - np.take(c, np.arange(n), axis)) / (2 * r + 1)
    return out


# ----- rendering ---------------------------------------------------------------------------------
def render_image(lay: Layout, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """The RGB image (H, W, 3) uint8 of layout `lay` in `domain`; `rng` draws per-image nuisance only."""
    h, w = lay.label.shape
    label = lay.label
    rgb = lay.colors[lay.inst].copy()
    rgb = _parts(rgb, lay)
    rgb *= class_gains(domain)[label]
    scale = 2.0 ** domain.value("texture_scale")
    rgb *= _texture_map(lay, domain.value("texture"), scale, rng.uniform(0, 100, 2))[..., None]
    rgb *= SHADE[lay.surf][..., None]
    rgb[label == SKY] = _sky(lay, domain, rng)

    rgb *= rng.uniform(0.9, 1.1)  # per-image exposure variation inside a domain
    rgb = _photometric(rgb, domain)
    beta = domain.value("fog")
    if beta > 0:
        t = np.exp(-beta * lay.depth)[..., None]
        rgb = rgb * t + np.array([0.78, 0.8, 0.83], np.float32) * (1 - t)
    night = domain.value("night")
    if night > 0:
        rgb = _night(rgb, lay, night, rng)
    blur = domain.value("blur") * w / 256
    if blur > 0:
        rgb = box_blur(rgb, blur)
    sigma = domain.value("noise")
    if sigma > 0:
        rgb = rgb + rng.normal(0, sigma, rgb.shape).astype(np.float32)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


SHADE = np.array([1.0, 0.86, 0.7, 0.82, 1.0], np.float32)  # by surface: ground, facades (two sides), frontal, sky


def _sky(lay: Layout, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """Sky pixels: the base sky colour, lighter towards the horizon, with soft clouds."""
    h, w = lay.label.shape
    r, c = np.nonzero(lay.label == SKY)
    r = r.astype(np.float32) / h
    base = np.asarray(BASE_RGB[SKY], np.float32) * class_gains(domain)[SKY]
    clouds = texture("smooth", c / w * 20 + rng.uniform(0, 50), r * 8 + rng.uniform(0, 50))
    return base * (0.85 + 0.35 * r[:, None]) + 0.15 * np.clip(clouds, 0, 1)[:, None]


def _parts(rgb: np.ndarray, lay: Layout) -> np.ndarray:
    """Colour the parts of objects: glass, tyres, lane paint, lamps, skin, trousers, bark."""
    p, label = lay.part, lay.label
    glass = p == WINDOW
    rgb[glass] = 0.3 * rgb[glass] + 0.7 * np.array([0.18, 0.22, 0.28], np.float32)
    rgb[p == WHEEL] = 0.07
    rgb[p == MARKING] = np.array([0.88, 0.88, 0.84], np.float32)
    lamp = p == LAMP
    vehicle_lamp = lamp & np.isin(label, (CAR, TRUCK, BUS))
    rgb[vehicle_lamp] = np.array([0.85, 0.1, 0.08], np.float32)
    light_lamp = lamp & (label == LIGHT)
    lamp_colours = np.array([[0.95, 0.15, 0.1], [1.0, 0.7, 0.1], [0.2, 0.95, 0.4]], np.float32)
    rgb[light_lamp] = lamp_colours[lay.inst[light_lamp] % 3]
    rgb[lamp & ~vehicle_lamp & ~light_lamp] = np.array([1.0, 0.9, 0.65], np.float32)
    skin = p == SKIN
    rgb[skin] = SKIN_TONES[lay.inst[skin] % len(SKIN_TONES)]
    legs = p == LEGS
    rgb[legs] = 0.35 * rgb[legs] + 0.65 * np.array([0.15, 0.16, 0.22], np.float32)
    rgb[p == TRUNK] = np.array([0.32, 0.24, 0.16], np.float32)
    return rgb


def _photometric(rgb: np.ndarray, d: Domain) -> np.ndarray:
    """Global transforms: brightness gain, saturation, hue rotation, colour cast, contrast."""
    rgb = rgb * 2.0 ** d.value("brightness")
    sat = 2.0 ** d.value("saturation")
    m = hue_matrix(d.value("hue"))
    grey = rgb.mean(-1, keepdims=True)
    rgb = grey + sat * (rgb - grey)
    rgb = rgb @ m.T
    cast = d.value("cast")
    rgb = rgb * np.array([1 + cast, 1 + 0.2 * cast, 1 - cast], np.float32)
    c = d.value("contrast")
    return 0.45 + c * (rgb - 0.45)


def _night(rgb: np.ndarray, lay: Layout, a: float, rng: np.random.Generator) -> np.ndarray:
    """Darken with a blue ambient, dark sky, lit windows, and glowing lamps (streetlights, traffic lights,
    vehicle lamps)."""
    h, w = lay.label.shape
    ambient = (1 - 0.88 * a) * np.array([1 - 0.3 * a, 1 - 0.15 * a, 1 + 0.1 * a], np.float32)
    out = rgb * ambient
    sky = lay.label == SKY
    out[sky] = (1 - a) * out[sky] + a * np.array([0.03, 0.04, 0.1], np.float32)
    # lit windows: a pseudo-random half of the window cells glow warm
    win = lay.part == WINDOW
    cell = (lay.inst * 7919 + np.floor(lay.tu * 0.6).astype(np.int64) * 104729 + np.floor(lay.tv * 0.5).astype(np.int64) * 1299709)
    lit = win & ((cell * 2654435761 % 2 ** 32) / 2 ** 32 < 0.45) & np.isin(lay.label, (2,))
    out[lit] = out[lit] * 0.3 + a * np.array([0.95, 0.75, 0.4], np.float32)
    lamps = lay.part == LAMP
    out[lamps] = rgb[lamps] * (0.6 + 0.6 * a)
    glow = np.zeros((h, w, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    colours = np.array([[1.0, 0.85, 0.55], [1, .2, .1], [1, .7, .1], [.3, 1, .5], [1, .25, .15]], np.float32)
    for r, c, radius, kind in lay.lights:
        rad = max(radius, 1.5) * 2.5
        r0, r1 = int(max(r - 3 * rad, 0)), int(min(r + 3 * rad + 1, h))
        c0, c1 = int(max(c - 3 * rad, 0)), int(min(c + 3 * rad + 1, w))
        if r1 <= r0 or c1 <= c0:
            continue
        g = np.exp(-((yy[r0:r1, c0:c1] - r) ** 2 + (xx[r0:r1, c0:c1] - c) ** 2) / (2 * rad ** 2))
        glow[r0:r1, c0:c1] += g[..., None] * colours[kind] * (0.8 if kind == 0 else 0.5)
    # street lights also light the ground below them
    return out + a * glow
