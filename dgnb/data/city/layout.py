"""Scene content: a street scene laid out in metres and rasterised through a pinhole camera.

The layout depends only on (seed, split, index) and the domain's *geometric* knobs (camera height,
pitch, object density). It yields, per pixel, the train id (label), the depth Z in metres and the
surface coordinates the renderer needs (texture coordinates in metres, a part id for windows,
wheels, lamps..., an instance id), never a colour: appearance is the style's job (`style.py`).

Camera: a pinhole at height `h_c` above a flat ground, focal length f (pixels), principal point
(c_x, c_y), looking along +Z and tilted down by `pitch`. A world point (X, Y, Z), with Y the height
above ground, projects to

    u = c_x + f X / Z,      v = v_h + f (h_c - Y) / Z,      v_h = c_y - f tan(pitch)   (horizon row)

so a ground row v > v_h sees depth Z = f h_c / (v - v_h).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..taxonomy import IGNORE_INDEX

# train ids (Cityscapes)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

# part ids: what a pixel is *within* its object (the renderer colours parts differently)
BODY, WINDOW, WHEEL, MARKING, LAMP, SKIN, LEGS, TRUNK = range(8)

# surface orientation (for shading): ground, facade facing +X (left of the street), facing -X, frontal, sky
GROUND, FACE_RIGHT, FACE_LEFT, FRONTAL, SKYSURF = range(5)

Z_FAR = 400.0  # depth given to sky pixels (for fog)


@dataclass
class Camera:
    height: int
    width: int
    cam_height: float = 1.6   # metres
    pitch_deg: float = 3.0    # looking down
    focal: float = 0.85       # in units of image width

    @property
    def f(self) -> float:
        return self.focal * self.width

    @property
    def cx(self) -> float:
        return self.width / 2

    @property
    def v_h(self) -> float:
        return self.height / 2 - self.f * np.tan(np.radians(self.pitch_deg))


@dataclass
class Layout:
    """Per-pixel content of one scene (all arrays H x W)."""

    label: np.ndarray   # uint8 train ids
    depth: np.ndarray   # float32 metres (Z_FAR for sky)
    tu: np.ndarray      # float32 texture coordinate along the surface (metres)
    tv: np.ndarray      # float32 texture coordinate up the surface (metres)
    part: np.ndarray    # uint8 part id
    inst: np.ndarray    # int32 instance id (index into `colors`)
    surf: np.ndarray    # uint8 surface orientation
    colors: np.ndarray  # (n_instances, 3) float32 content colour of each instance (before styling)
    lights: list[tuple[float, float, float, int]] = field(default_factory=list)  # (row, col, radius px, kind)


class Canvas:
    """Z-buffered rasteriser: `paint` writes a mask where it is nearer than what is there."""

    def __init__(self, cam: Camera) -> None:
        h, w = cam.height, cam.width
        self.cam = cam
        self.label = np.full((h, w), SKY, np.uint8)
        self.depth = np.full((h, w), Z_FAR, np.float32)
        self.tu = np.zeros((h, w), np.float32)
        self.tv = np.zeros((h, w), np.float32)
        self.part = np.zeros((h, w), np.uint8)
        self.inst = np.zeros((h, w), np.int32)
        self.surf = np.full((h, w), SKYSURF, np.uint8)
        self.colors: list[np.ndarray] = [np.zeros(3, np.float32)]  # instance 0 = sky
        self.lights: list[tuple[float, float, float, int]] = []
        self.rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
        self.cols = np.arange(w, dtype=np.float32)[None, :] + 0.5

    def new_instance(self, color: np.ndarray) -> int:
        self.colors.append(np.asarray(color, np.float32))
        return len(self.colors) - 1

    def paint(self, sl: tuple[slice, slice], mask: np.ndarray, z: np.ndarray | float, label: np.ndarray | int,
              part: np.ndarray | int, tu: np.ndarray | float, tv: np.ndarray | float, inst: np.ndarray | int,
              surf: int) -> None:
        """Write every field where `mask` holds and `z` is nearer than the current depth."""
        write = mask & (z < self.depth[sl])
        if not write.any():
            return
        for buf, val in ((self.depth, z), (self.tu, tu), (self.tv, tv), (self.part, part), (self.label, label),
                         (self.inst, inst), (self.surf, surf)):
            view = buf[sl]
            if np.ndim(val) == 0:
                view[write] = val
            elif val.shape == mask.shape:
                view[write] = val[write]
            else:
                view[write] = np.broadcast_to(val, mask.shape)[write]

    def layout(self) -> Layout:
        return Layout(self.label, self.depth, self.tu, self.tv, self.part, self.inst, self.surf,
                      np.stack(self.colors).astype(np.float32), self.lights)

    # ----- primitives ----------------------------------------------------------------------
    def ground(self, road_x: float, road_half: float, sidewalk: float, lane_width: float, inst: dict[int, int]) -> None:
        """The ground plane: road, sidewalks (with kerb), terrain beyond; lane markings as a part."""
        c = self.cam
        below = self.rows > c.v_h + 0.5
        z = np.where(below, c.f * c.cam_height / np.maximum(self.rows - c.v_h, 1e-3), Z_FAR).astype(np.float32)
        z = np.broadcast_to(z, (c.height, c.width))
        x = (self.cols - c.cx) * z / c.f
        d = np.abs(x - road_x)
        label = np.where(d < road_half, ROAD, np.where(d < road_half + sidewalk, SIDEWALK, TERRAIN)).astype(np.uint8)
        # lane markings: dashed lines between lanes, solid edge lines (part of the road class)
        lane_pos = (x - road_x + road_half) / lane_width
        near_line = np.abs(lane_pos - np.round(lane_pos)) * lane_width < 0.08
        dashed = (np.floor(z / 4.0) % 2 == 0) | (np.abs(d - road_half) < 0.5)
        part = np.where((label == ROAD) & near_line & dashed & (d > 0.2 * lane_width), MARKING, BODY).astype(np.uint8)
        lut = np.zeros(256, np.int32)
        for cls, i in inst.items():
            lut[cls] = i
        mask = np.broadcast_to(below, (c.height, c.width))
        self.paint((slice(None), slice(None)), mask, z, label, part, x, z, lut[label], GROUND)

    def facade(self, x_plane: float, z_edges: np.ndarray, heights: np.ndarray, classes: np.ndarray,
               insts: np.ndarray, windows: np.ndarray) -> None:
        """A row of vertical segments in the plane X = x_plane, segment k spanning Z in [z_k, z_{k+1}].

        Per image column u the plane is at depth Z(u) = f x_plane / (u - c_x); the segment found
        there spans rows v_h + f (h_c - height) / Z to v_h + f h_c / Z.
        """
        c = self.cam
        du = self.cols[0] - c.cx
        with np.errstate(divide="ignore", invalid="ignore"):
            z = c.f * x_plane / du
        valid = (z > z_edges[0]) & (z < z_edges[-1]) & np.isfinite(z)
        if not valid.any():
            return
        cols = np.nonzero(valid)[0]
        z = z[cols].astype(np.float32)
        seg = np.clip(np.searchsorted(z_edges, z) - 1, 0, len(heights) - 1)
        top = c.v_h + c.f * (c.cam_height - heights[seg]) / z
        bottom = c.v_h + c.f * c.cam_height / z
        rows = self.rows
        mask = (rows >= top) & (rows < bottom) & (classes[seg] != IGNORE_INDEX)
        y = c.cam_height - (rows - c.v_h) * z / c.f  # height above ground of each pixel
        y = np.broadcast_to(y, mask.shape)
        zz = np.broadcast_to(z, mask.shape)
        # windows: a grid in (Z, Y) on building segments with a window pattern
        spacing = windows[seg]  # metres, 0 = no windows
        with np.errstate(divide="ignore", invalid="ignore"):
            fu = np.where(spacing > 0, (z / np.maximum(spacing, 1e-3)) % 1.0, 0.0)
            fv = (y / np.maximum(spacing, 1e-3)[None, :] * 0.8) % 1.0
        win = (spacing > 0) & (fu > 0.25) & (fu < 0.75) & (fv > 0.3) & (fv < 0.8) & (y > 2.5)
        part = np.where(win, WINDOW, BODY).astype(np.uint8)
        surf = FACE_RIGHT if x_plane < 0 else FACE_LEFT
        sl = (slice(None), slice(cols[0], cols[-1] + 1))
        self.paint(sl, mask, zz, classes[seg][None, :], part, zz, y, insts[seg][None, :], surf)

    def backdrop(self, z: float, x_edges: np.ndarray, heights: np.ndarray, classes: np.ndarray, insts: np.ndarray,
                 windows: np.ndarray) -> None:
        """Frontal blocks at depth `z` (the end of the street), block k spanning X in [x_k, x_{k+1}]."""
        c = self.cam
        x = (self.cols[0] - c.cx) * z / c.f
        blk = np.clip(np.searchsorted(x_edges, x) - 1, 0, len(heights) - 1)
        top = c.v_h + c.f * (c.cam_height - heights[blk]) / z
        bottom = c.v_h + c.f * c.cam_height / z
        mask = (self.rows >= top) & (self.rows < bottom)
        y = np.broadcast_to(c.cam_height - (self.rows - c.v_h) * z / c.f, mask.shape)
        xx = np.broadcast_to(x, mask.shape)
        spacing = windows[blk]
        fu = (x / np.maximum(spacing, 1e-3)) % 1.0
        fv = (y / np.maximum(spacing, 1e-3)[None, :] * 0.8) % 1.0
        win = (spacing > 0) & (fu > 0.25) & (fu < 0.75) & (fv > 0.3) & (fv < 0.8) & (y > 2.5)
        part = np.where(win, WINDOW, BODY).astype(np.uint8)
        self.paint((slice(None), slice(None)), mask, z, classes[blk][None, :], part, xx, y, insts[blk][None, :], FRONTAL)

    def billboard(self, x: float, z: float, width: float, height: float, y0: float = 0.0):
        """Pixel box of a frontal rectangle (X in x +- width/2, Y in [y0, y0 + height]) at depth z, and the
        local metric coordinates (lx across from the centre, ly up from the bottom) of its pixels."""
        c = self.cam
        if z < 0.5:
            return None
        u0, u1 = c.cx + c.f * (x - width / 2) / z, c.cx + c.f * (x + width / 2) / z
        v0, v1 = c.v_h + c.f * (c.cam_height - y0 - height) / z, c.v_h + c.f * (c.cam_height - y0) / z
        if v1 - v0 < 1.5 or u1 < 0 or u0 > c.width or v1 < 0 or v0 > c.height:
            return None
        r0, r1 = max(int(np.floor(v0)), 0), min(int(np.ceil(v1)), c.height)
        c0, c1 = max(int(np.floor(u0)), 0), min(int(np.ceil(u1)), c.width)
        if r1 <= r0 or c1 <= c0:
            return None
        zero = np.zeros((r1 - r0, c1 - c0), np.float32)
        lx = (self.cols[:, c0:c1] - c.cx) * z / c.f - x + zero
        ly = (c.cam_height - y0) - (self.rows[r0:r1] - c.v_h) * z / c.f + zero
        return (slice(r0, r1), slice(c0, c1)), lx, ly

    def side(self, x_plane: float, z0: float, z1: float, height: float):
        """Pixel box of a vertical rectangle in the plane X = x_plane spanning Z in [z0, z1], Y in [0, height];
        returns the slice, a validity mask, and the (Z, Y) coordinates of its pixels."""
        c = self.cam
        if abs(x_plane) < 0.05 or z0 < 0.5:
            return None
        us = sorted((c.cx + c.f * x_plane / z0, c.cx + c.f * x_plane / z1))
        c0, c1 = max(int(np.floor(us[0])), 0), min(int(np.ceil(us[1])), c.width)
        r0 = max(int(np.floor(c.v_h + c.f * (c.cam_height - height) / z1 if c.cam_height > height else
                              c.v_h + c.f * (c.cam_height - height) / z0)), 0)
        r1 = min(int(np.ceil(c.v_h + c.f * c.cam_height / z0)), c.height)
        if c1 <= c0 or r1 <= r0:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            z = c.f * x_plane / (self.cols[:, c0:c1] - c.cx)
        y = c.cam_height - (self.rows[r0:r1] - c.v_h) * z / c.f
        z = z + np.zeros_like(y)
        ok = (z >= z0) & (z <= z1) & (y >= 0) & (y <= height)
        return (slice(r0, r1), slice(c0, c1)), ok, z.astype(np.float32), y.astype(np.float32)
