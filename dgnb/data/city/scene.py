"""Sampling a street scene: the road, the facades, and the objects on and beside the road.

Everything here is *content*: positions and sizes in metres, classes, and each instance's content
colour (a car's paint, a facade's material) drawn around one shared semantic base palette. The
domain style later transforms these colours globally and per class, so that a class looks related
in every domain (docs/city.md, 'Why one base palette': independent palettes make a useless benchmark).
"""

from __future__ import annotations

import numpy as np

from ..taxonomy import IGNORE_INDEX
from .layout import (BICYCLE, BODY, BUILDING, BUS, CAR, FENCE, FRONTAL, LAMP, LEGS, LIGHT, MOTORCYCLE, PERSON,
                     POLE, RIDER, ROAD, SIDEWALK, SIGN, SKIN, TERRAIN, TRUCK, TRUNK, VEGETATION, WALL, WHEEL, WINDOW,
                     Camera, Canvas, Layout)

# The shared semantic base colours (RGB in [0, 1]) every domain starts from.
BASE_RGB = {
    ROAD: (0.34, 0.34, 0.36), SIDEWALK: (0.64, 0.61, 0.57), BUILDING: (0.58, 0.47, 0.38), WALL: (0.66, 0.63, 0.52),
    FENCE: (0.48, 0.38, 0.28), POLE: (0.36, 0.37, 0.40), LIGHT: (0.14, 0.14, 0.12), SIGN: (0.85, 0.72, 0.10),
    VEGETATION: (0.22, 0.45, 0.16), TERRAIN: (0.55, 0.55, 0.26), 10: (0.55, 0.72, 0.93),
}
CAR_PAINT = np.array([(0.9, 0.9, 0.9), (0.12, 0.12, 0.13), (0.55, 0.56, 0.58), (0.7, 0.12, 0.1), (0.15, 0.25, 0.55),
                      (0.75, 0.75, 0.78), (0.3, 0.35, 0.3)], np.float32)
BUS_PAINT = np.array([(0.8, 0.15, 0.12), (0.9, 0.75, 0.1), (0.2, 0.4, 0.7), (0.88, 0.88, 0.85)], np.float32)
SIGN_PAINT = np.array([(0.85, 0.72, 0.10), (0.15, 0.3, 0.75), (0.8, 0.12, 0.1), (0.9, 0.9, 0.9)], np.float32)
SKIN_TONES = np.array([(0.85, 0.65, 0.5), (0.6, 0.42, 0.3), (0.4, 0.28, 0.2)], np.float32)


def _jitter(rng: np.random.Generator, rgb, amount: float) -> np.ndarray:
    """A colour near `rgb`: a random overall gain and a small random tint, both of size ~`amount`."""
    r = rng.random(4)
    out = np.asarray(rgb, np.float32) * (1 + amount * (2 * r[0] - 1)) + amount / 3 * (2 * r[1:] - 1)
    return out.clip(0, 1).astype(np.float32)


def sample_layout(rng: np.random.Generator, cam: Camera, density: float = 1.0) -> Layout:
    """One street scene. `density` multiplies the expected number of every kind of object."""
    cv = Canvas(cam)
    lane_w = 3.2
    lanes = int(rng.integers(2, 5))
    road_half = lanes * lane_w / 2
    road_x = float(rng.uniform(-1.5, 1.5))
    sidewalk = float(rng.uniform(2.0, 4.0))
    ground_inst = {c: cv.new_instance(_jitter(rng, BASE_RGB[c], 0.08)) for c in (ROAD, SIDEWALK, TERRAIN)}
    cv.ground(road_x, road_half, sidewalk, lane_w, ground_inst)

    z_end = float(rng.uniform(60, 160))
    if rng.random() < 0.6:  # the street ends at a row of buildings
        x_edges = np.cumsum(np.r_[-80, rng.uniform(8, 25, 16)]).astype(np.float32)
        n = len(x_edges) - 1
        kinds = rng.choice([BUILDING, VEGETATION], n, p=[0.8, 0.2])
        heights = np.where(kinds == BUILDING, rng.uniform(8, 35, n), rng.uniform(5, 12, n)).astype(np.float32)
        insts = _facade_colours(cv, rng, kinds)
        win = np.where(kinds == BUILDING, rng.uniform(2.5, 4.0, n), 0).astype(np.float32)
        cv.backdrop(z_end, x_edges, heights, kinds.astype(np.uint8), insts, win)

    for side in (-1, 1):
        kerb = road_x + side * (road_half + sidewalk)
        setback = float(rng.choice([0.0, rng.uniform(1, 6)], p=[0.6, 0.4]))
        _facade_row(cv, rng, kerb + side * setback, z_end, front=True)
        _facade_row(cv, rng, kerb + side * (setback + rng.uniform(12, 25)), z_end, front=False)

    _street_furniture(cv, rng, road_x, road_half, sidewalk, density)
    _vehicles(cv, rng, road_x, road_half, lanes, lane_w, density)
    _people(cv, rng, road_x, road_half, sidewalk, density)
    return cv.layout()


FACADES = np.array([(0.58, 0.47, 0.38), (0.55, 0.55, 0.56), (0.55, 0.30, 0.22), (0.78, 0.75, 0.68)], np.float32)


def _facade_colours(cv: Canvas, rng: np.random.Generator, kinds: np.ndarray) -> np.ndarray:
    """New instances for facade segments: buildings in beige, grey, brick or plaster; others from the base."""
    base = np.array([BASE_RGB.get(int(k), (0, 0, 0)) for k in kinds], np.float32).reshape(-1, 3)
    base[kinds == BUILDING] = FACADES[rng.integers(0, len(FACADES), int((kinds == BUILDING).sum()))]
    r = rng.random((len(kinds), 4)).astype(np.float32)
    cols = (base * (1 + 0.1 * (2 * r[:, :1] - 1)) + 0.033 * (2 * r[:, 1:] - 1)).clip(0, 1)
    first = len(cv.colors)
    cv.colors.extend(cols)
    ids = np.arange(first, first + len(kinds), dtype=np.int32)
    return np.where(kinds == IGNORE_INDEX, 0, ids).astype(np.int32)


def _facade_row(cv: Canvas, rng: np.random.Generator, x_plane: float, z_end: float, front: bool) -> None:
    """Segments along the street: buildings, walls, fences, hedges and gaps (front row) or a back row."""
    lengths = rng.uniform(6, 28, 24)
    z_edges = np.cumsum(np.r_[1.0, lengths]).astype(np.float32)
    z_edges = z_edges[: np.searchsorted(z_edges, z_end) + 1]
    n = len(z_edges) - 1
    if n < 1:
        return
    if front:
        kinds = rng.choice([BUILDING, VEGETATION, WALL, FENCE, IGNORE_INDEX], n, p=[0.5, 0.15, 0.13, 0.12, 0.1])
    else:
        kinds = rng.choice([BUILDING, VEGETATION, IGNORE_INDEX], n, p=[0.6, 0.3, 0.1])
    h = {BUILDING: (7, 30), VEGETATION: (3, 9), WALL: (1.2, 3.0), FENCE: (1.0, 2.2), IGNORE_INDEX: (0, 0)}
    lo, hi = np.array([h[int(k)] for k in kinds], np.float32).reshape(-1, 2).T
    heights = (lo + (hi - lo) * rng.random(n)).astype(np.float32)
    insts = _facade_colours(cv, rng, kinds)
    win = np.where(kinds == BUILDING, rng.uniform(2.5, 4.0, n), 0).astype(np.float32)
    cv.facade(x_plane, z_edges, heights, kinds.astype(np.uint8), insts, win)


# ----- objects ------------------------------------------------------------------------------------
def _count(rng: np.random.Generator, mean: float, density: float) -> int:
    return int(rng.poisson(mean * density))


def _street_furniture(cv: Canvas, rng: np.random.Generator, road_x: float, road_half: float, sidewalk: float,
                      density: float) -> None:
    """Poles (street lights, sign poles, traffic lights) at the kerb and trees on the sidewalk."""
    for side in (-1, 1):
        for _ in range(_count(rng, 7, density)):
            x = road_x + side * (road_half + rng.uniform(0.3, 0.8))
            z = float(rng.uniform(3, 45))
            kind = rng.choice(["lamp", "sign", "light"], p=[0.4, 0.35, 0.25])
            _pole(cv, rng, x, z, kind, side)
        for _ in range(_count(rng, 2.5, density)):
            x = road_x + side * (road_half + sidewalk * rng.uniform(0.5, 0.9))
            _tree(cv, rng, x, float(rng.uniform(4, 60)))


def _pole(cv: Canvas, rng: np.random.Generator, x: float, z: float, kind: str, side: int) -> None:
    height = float(rng.uniform(3.0, 4.0) if kind == "sign" else rng.uniform(4.5, 7.0))
    width = float(rng.uniform(0.12, 0.22))
    colour = _jitter(rng, BASE_RGB[POLE], 0.1)
    b = cv.billboard(x, z, width, height)
    if b is not None:
        sl, lx, ly = b
        cv.paint(sl, np.ones(lx.shape, bool), z, POLE, BODY, lx, ly, cv.new_instance(colour), FRONTAL)
    if kind == "lamp":  # an arm over the road with a lamp head
        arm = cv.billboard(x - side * 0.8, z, 1.6, 0.15, height - 0.15)
        if arm is not None:
            sl, lx, ly = arm
            head = (np.abs(lx + side * 0.7) < 0.1)
            cv.paint(sl, np.ones(lx.shape, bool), z, POLE, np.where(head, LAMP, BODY), lx, ly,
                     cv.new_instance(colour), FRONTAL)
            if head.any():
                col = sl[1].start + int(np.argmax(head[-1]))
                cv.lights.append((float(sl[0].stop), float(col), cv.cam.f * 2.0 / z, 0))
    elif kind == "sign":
        w = float(rng.uniform(0.7, 1.1))
        b = cv.billboard(x, z - 0.05, w, w, height - w)
        if b is not None:
            sl, lx, ly = b
            shape = rng.integers(3)
            r = w / 2
            cx, cy = lx, ly - r
            if shape == 0:
                mask = cx ** 2 + cy ** 2 < r ** 2
            elif shape == 1:
                mask = (cy > -r) & (np.abs(cx) < (r - cy) * 0.58)  # triangle, apex up
            else:
                mask = np.ones(lx.shape, bool)
            border = np.where(np.abs(cx) ** 2 + np.abs(cy) ** 2 > (0.8 * r) ** 2, WINDOW, BODY)
            colour = _jitter(rng, SIGN_PAINT[rng.integers(len(SIGN_PAINT))], 0.06)
            cv.paint(sl, mask, z - 0.05, SIGN, border, lx, ly, cv.new_instance(colour), FRONTAL)
    else:  # traffic light: a box with three lamps, one lit
        b = cv.billboard(x, z - 0.05, 0.5, 1.2, height - 1.2)
        if b is not None:
            sl, lx, ly = b
            lit = int(rng.integers(3))
            lamp_y = np.array([0.96, 0.6, 0.24])
            dist = np.min(np.abs(ly[..., None] - lamp_y), -1)
            is_lamp = (dist < 0.13) & (np.abs(lx) < 0.13)
            which = np.argmin(np.abs(ly[..., None] - lamp_y), -1)
            part = np.where(is_lamp & (which == lit), LAMP, np.where(is_lamp, WINDOW, BODY))
            cv.paint(sl, np.ones(lx.shape, bool), z - 0.05, LIGHT, part, lx, ly,
                     cv.new_instance(_jitter(rng, BASE_RGB[LIGHT], 0.1)), FRONTAL)
            rows = np.nonzero((part == LAMP).any(1))[0]
            if len(rows):
                cv.lights.append((float(sl[0].start + rows.mean()), float((sl[1].start + sl[1].stop) / 2),
                                  cv.cam.f * 0.6 / z, 1 + lit))


def _tree(cv: Canvas, rng: np.random.Generator, x: float, z: float) -> None:
    """A trunk and a lumpy canopy (both vegetation, as in Cityscapes)."""
    trunk_h = float(rng.uniform(1.8, 3.0))
    w, h = float(rng.uniform(2.5, 5.0)), float(rng.uniform(2.5, 5.0))
    inst = cv.new_instance(_jitter(rng, BASE_RGB[VEGETATION], 0.15))
    b = cv.billboard(x, z, 0.3, trunk_h + 0.5)
    if b is not None:
        sl, lx, ly = b
        cv.paint(sl, np.ones(lx.shape, bool), z, VEGETATION, TRUNK, lx, ly, inst, FRONTAL)
    b = cv.billboard(x, z - 0.1, w, h, trunk_h)
    if b is not None:
        sl, lx, ly = b
        ang = np.arctan2(ly - h / 2, lx)
        phase = rng.uniform(0, 2 * np.pi, 3)
        bump = 1 + 0.12 * (np.sin(5 * ang + phase[0]) + np.sin(9 * ang + phase[1]) + np.sin(13 * ang + phase[2])) / 3
        mask = (lx / (w / 2)) ** 2 + ((ly - h / 2) / (h / 2)) ** 2 < bump ** 2
        cv.paint(sl, mask, z - 0.1, VEGETATION, BODY, lx, ly, inst, FRONTAL)


def _vehicles(cv: Canvas, rng: np.random.Generator, road_x: float, road_half: float, lanes: int, lane_w: float,
              density: float) -> None:
    """Cars, trucks and buses in the lanes and parked at the kerb (seen from behind, with a visible side)."""
    n = _count(rng, 5.0, density)
    kinds = rng.choice([CAR, TRUCK, BUS], n, p=[0.72, 0.14, 0.14])
    lane = rng.integers(0, lanes, n)
    xs = road_x - road_half + (lane + 0.5) * lane_w + rng.normal(0, 0.25, n)
    parked = rng.random(n) < 0.3
    side = np.where(rng.random(n) < 0.5, -1, 1)
    xs = np.where(parked & (kinds == CAR), road_x + side * (road_half - 1.1), xs)
    zs = rng.uniform(5, 50, n)
    taken: list[tuple[float, float, float]] = []
    for kind, x, z in sorted(zip(kinds, xs, zs), key=lambda t: t[2]):
        length = {CAR: 4.5, TRUCK: 8.0, BUS: 12.0}[int(kind)]
        if any(abs(x - tx) < 2.2 and tz - 1.5 < z < tz + tl + 1.5 for tx, tz, tl in taken):
            continue
        taken.append((x, z, length))
        _vehicle(cv, rng, int(kind), float(x), float(z), length)


def _vehicle(cv: Canvas, rng: np.random.Generator, kind: int, x: float, z: float, length: float) -> None:
    w, h = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.3), BUS: (2.6, 3.2)}[kind]
    paint = CAR_PAINT[rng.integers(len(CAR_PAINT))] if kind != BUS else BUS_PAINT[rng.integers(len(BUS_PAINT))]
    inst = cv.new_instance(_jitter(rng, paint, 0.06))
    # visible side panel (the side facing the camera axis)
    if abs(x) > w / 2 + 0.2:
        xs = x - np.sign(x) * w / 2
        s = cv.side(xs, z, z + length, h)
        if s is not None:
            sl, ok, zz, yy = s
            t = zz - z
            body = ok & _profile(kind, t, yy, length, h)
            wheels = ((t - 0.9) ** 2 + (yy - 0.35) ** 2 < 0.33 ** 2) | ((t - length + 1.0) ** 2 + (yy - 0.35) ** 2 < 0.33 ** 2)
            win = _side_windows(kind, t, yy, length, h)
            part = np.where(wheels, WHEEL, np.where(win, WINDOW, BODY))
            cv.paint(sl, body | (ok & wheels), zz, kind, part, zz, yy, inst, FRONTAL)
    b = cv.billboard(x, z, w, h)
    if b is None:
        return
    sl, lx, ly = b
    ax = np.abs(lx) / (w / 2)
    if kind == CAR:  # body up to 0.9 m, cabin narrowing to the roof
        cabin = (ly > 0.9) & (ax < 1 - 0.35 * (ly - 0.9) / (h - 0.9))
        mask = (ly <= 0.9) | cabin
        win = (ly > 0.98) & (ly < h - 0.1) & (ax < 0.8 - 0.35 * (ly - 0.9) / (h - 0.9))
    elif kind == TRUCK:
        mask = np.ones(lx.shape, bool)
        win = np.zeros(lx.shape, bool)
    else:
        mask = np.ones(lx.shape, bool)
        win = (ly > 1.6) & (ly < 2.9) & (ax < 0.85)
    wheels = (ly < 0.4) & (ax > 0.55) & (ax < 0.9)
    lamps = (np.abs(ly - 0.75) < 0.1) & (ax > 0.75)
    part = np.where(lamps, LAMP, np.where(wheels, WHEEL, np.where(win, WINDOW, BODY)))
    cv.paint(sl, mask, z, kind, part, lx, ly, inst, FRONTAL)
    if lamps.any():
        rows = np.nonzero(lamps.any(1))[0]
        for sgn in (-1, 1):
            cols = np.nonzero((lamps & (np.sign(lx) == sgn)).any(0))[0]
            if len(cols):
                cv.lights.append((float(sl[0].start + rows.mean()), float(sl[1].start + cols.mean()),
                                  cv.cam.f * 0.5 / z, 4))


def _profile(kind: int, t: np.ndarray, y: np.ndarray, length: float, h: float) -> np.ndarray:
    """Side silhouette in (distance along the vehicle t, height y)."""
    if kind == CAR:
        hood = y <= 0.9
        cabin = (t > 1.2) & (t < length - 0.8) & (y <= h)
        return (hood & (y >= 0.2)) | cabin
    if kind == TRUCK:
        return (y >= 0.3) & ((t > 2.2) | (y < h * 0.85))  # box, lower cab in front
    return y >= 0.25


def _side_windows(kind: int, t: np.ndarray, y: np.ndarray, length: float, h: float) -> np.ndarray:
    if kind == CAR:
        return (y > 1.0) & (y < h - 0.1) & (t > 1.4) & (t < length - 1.0)
    if kind == BUS:
        return (y > 1.6) & (y < 2.8) & ((t % 1.6) > 0.2)
    return (y > 1.5) & (y < 2.5) & (t > length - 2.0)


def _people(cv: Canvas, rng: np.random.Generator, road_x: float, road_half: float, sidewalk: float,
            density: float) -> None:
    """Pedestrians on the sidewalks (some crossing), riders crossing the road on bicycles and motorcycles,
    and parked bicycles."""
    for _ in range(_count(rng, 8, density)):
        side = 1 if rng.random() < 0.5 else -1
        crossing = rng.random() < 0.12
        x = road_x + (rng.uniform(-road_half, road_half) if crossing else side * (road_half + rng.uniform(0.3, sidewalk)))
        _person(cv, rng, float(x), float(rng.uniform(3, 30)), PERSON, float(rng.uniform(1.55, 1.9)))
    for _ in range(_count(rng, 2.5, density)):
        x = road_x + rng.uniform(-road_half + 1, road_half - 1)
        z = float(rng.uniform(4, 30))
        motor = rng.random() < 0.4
        _two_wheeler(cv, rng, float(x), z, MOTORCYCLE if motor else BICYCLE)
        _person(cv, rng, float(x), z - 0.05, RIDER, 1.0, y0=0.75 if not motor else 0.6, seated=True)
    for _ in range(_count(rng, 1.5, density)):
        side = 1 if rng.random() < 0.5 else -1
        x = road_x + side * (road_half + rng.uniform(0.3, sidewalk))
        _two_wheeler(cv, rng, float(x), float(rng.uniform(4, 30)), BICYCLE)


def _person(cv: Canvas, rng: np.random.Generator, x: float, z: float, cls: int, height: float, y0: float = 0.0,
            seated: bool = False) -> None:
    """Head, torso, arms and legs (legs omitted when seated on a two-wheeler)."""
    b = cv.billboard(x, z, 0.7, height, y0)
    if b is None:
        return
    sl, lx, ly = b
    h = height
    head_r = 0.11 if not seated else 0.12
    head = lx ** 2 + (ly - (h - head_r)) ** 2 < head_r ** 2
    torso_lo = 0.85 * h / 1.75 if not seated else 0.05
    torso = (np.abs(lx) < 0.2) & (ly > torso_lo) & (ly < h - 2 * head_r)
    arms = (np.abs(lx) > 0.2) & (np.abs(lx) < 0.27) & (ly > torso_lo + 0.1) & (ly < h - 2 * head_r - 0.05)
    legs = (np.abs(lx) > 0.02) & (np.abs(lx) < 0.17) & (ly <= torso_lo + 0.02) & (not seated)
    part = np.where(head, SKIN, np.where(legs, LEGS, BODY))
    clothes = rng.uniform(0.05, 0.85, 3).astype(np.float32)
    cv.paint(sl, head | torso | arms | legs, z, cls, part, lx, ly, cv.new_instance(clothes), FRONTAL)


def _two_wheeler(cv: Canvas, rng: np.random.Generator, x: float, z: float, cls: int) -> None:
    """Side view: two wheels, a frame (bicycle) or a body (motorcycle)."""
    length, r = (1.7, 0.34) if cls == BICYCLE else (2.0, 0.32)
    b = cv.billboard(x, z, length + 0.1, 1.1)
    if b is None:
        return
    sl, lx, ly = b
    wx = length / 2 - r
    d0 = np.sqrt((lx + wx) ** 2 + (ly - r) ** 2)
    d1 = np.sqrt((lx - wx) ** 2 + (ly - r) ** 2)
    if cls == BICYCLE:
        wheel = (np.abs(d0 - r) < 0.05) | (np.abs(d1 - r) < 0.05)
        frame = _segment(lx, ly, (-wx, r), (0.0, r + 0.05), 0.04) | _segment(lx, ly, (0.0, r + 0.05), (wx - 0.1, 0.85), 0.04) \
            | _segment(lx, ly, (-wx, r), (-0.1, 0.85), 0.04) | _segment(lx, ly, (-0.1, 0.85), (wx - 0.1, 0.85), 0.04)
        mask, part = wheel | frame, np.where(wheel, WHEEL, BODY)
    else:
        wheel = (d0 < r) | (d1 < r)
        body = ((lx / (length * 0.38)) ** 2 + ((ly - 0.65) / 0.25) ** 2 < 1)
        mask, part = wheel | body, np.where(wheel & ~body, WHEEL, BODY)
    paint = rng.uniform(0.05, 0.6, 3).astype(np.float32)
    cv.paint(sl, mask, z, cls, part, lx, ly, cv.new_instance(paint), FRONTAL)


def _segment(x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float], width: float) -> np.ndarray:
    """Pixels within `width` of the segment a-b."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return (x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2 < width ** 2
