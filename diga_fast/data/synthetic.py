"""The built-in domain pair: procedural street scenes in a "game" look (source) and a "photo" look
(target), labelled in the 19 Cityscapes train ids (11 of them occur: road, sidewalk, building, fence,
pole, traffic sign, vegetation, terrain, sky, person, car; every pixel is labelled, none is 255).

Every image is drawn independently from ``(seed, domain, split, index)``, so a dataset of any size is
random-access, deterministic and cheap (a 128 x 256 image takes about 3 ms (source) / 4-5 ms
(target) of numpy).

A scene is made in two steps, each with its own random stream:

1. **Layout** (the labels): a road vanishing towards a point on the horizon, sidewalks, terrain
   strips, facades of buildings / hedges / open ground along both sides, fences, and objects drawn
   far to near: trees, poles (some with a traffic sign), people, cars. Sizes follow a pinhole camera
   at a fixed height: an object at depth ``t`` (1 at the bottom row, 0 at the horizon) stands ``t``
   times as tall as near the camera. The domains draw the geometry from slightly different
   distributions (``SOURCE_GEOMETRY`` / ``TARGET_GEOMETRY``: the target has a higher horizon, a
   narrower road, more vegetation, poles and people, fewer cars), as GTA5 and Cityscapes do.
2. **Painting** (the image): every part (a facade, a car body, a tree crown, ...) gets a colour from
   its material's palette, then shading and textures in perspective (``SOURCE_LOOK`` /
   ``TARGET_LOOK``):
   - source, a game engine: saturated colours (purple-grey road, pink sidewalks, bright green
     vegetation, deep blue sky), flat blue windows, weak textures, no camera effects;
   - target, a camera: a shifted palette (greyer road and sidewalks, olive vegetation, pale sky,
     darker poles), strong procedural textures (asphalt grain and patches, paving joints, bricks,
     dark reflective windows, leaf noise, grass, clouds), per-image illumination (exposure, colour
     cast, gamma, a light gradient, a cast shadow over the street), then blur, vignetting, sensor
     noise and JPEG-like 8 x 8 blockiness.

The gap is mostly appearance: global colour and illumination (which Fourier domain adaptation and
colour augmentation address) plus per-class colour shifts and textures (which self-training on the
target can fix), over a mild shift of the geometry distribution.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from diga_fast.labels import CITYSCAPES19
from diga_fast.errors import DigaError

DOMAINS = ("source", "target")
SPLITS = ("train", "val")
DEFAULT_SIZE = (128, 256)

_C = {name: k for k, name in enumerate(CITYSCAPES19.classes)}
ROAD, SIDEWALK, BUILDING, FENCE, POLE = _C["road"], _C["sidewalk"], _C["building"], _C["fence"], _C["pole"]
SIGN, VEGETATION, TERRAIN, SKY = _C["traffic sign"], _C["vegetation"], _C["terrain"], _C["sky"]
PERSON, CAR = _C["person"], _C["car"]
#: The class indices the generator can produce (no 255: every pixel is labelled).
SYNTHETIC_CLASSES = (ROAD, SIDEWALK, BUILDING, FENCE, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)

# Materials: what a labelled part is made of (the painter colours materials, the label is the class).
(M_ROAD, M_SIDEWALK, M_TERRAIN, M_SKY, M_FACADE, M_HEDGE, M_CROWN, M_TRUNK, M_FENCE, M_POLE, M_SIGN,
 M_SKIN, M_CLOTH, M_CAR_BODY, M_CAR_GLASS, M_CAR_LAMP, M_WHEEL) = range(17)
# Parts (labelled regions that get one colour each) 1..4 are the ground and the sky; objects add more.
P_ROAD, P_SIDEWALK, P_TERRAIN, P_SKY = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class GeometryStyle:
    horizon: tuple[float, float]  # horizon row as a fraction of H
    road_half_width: tuple[float, float]  # at the bottom row, fraction of W
    sidewalk_width: tuple[float, float]
    terrain_prob: float
    segment_probs: tuple[float, float, float]  # building, hedge/park, open ground
    building_height: tuple[float, float]  # roof above the horizon, in camera heights
    trees: tuple[int, int]
    poles: tuple[int, int]
    people: tuple[int, int]
    cars: tuple[int, int]
    fence_prob: float


SOURCE_GEOMETRY = GeometryStyle(
    horizon=(0.40, 0.50), road_half_width=(0.40, 0.62), sidewalk_width=(0.18, 0.32), terrain_prob=0.35,
    segment_probs=(0.75, 0.12, 0.13), building_height=(1.0, 6.0), trees=(0, 4), poles=(1, 5),
    people=(0, 4), cars=(1, 6), fence_prob=0.5,
)
TARGET_GEOMETRY = GeometryStyle(
    horizon=(0.36, 0.46), road_half_width=(0.36, 0.56), sidewalk_width=(0.20, 0.36), terrain_prob=0.5,
    segment_probs=(0.65, 0.22, 0.13), building_height=(1.5, 7.0), trees=(1, 6), poles=(2, 6),
    people=(1, 6), cars=(0, 5), fence_prob=0.6,
)


@dataclass
class Layout:
    """A scene's geometry: labels, the part (instance) each pixel belongs to, and what the painter
    needs to put textures in perspective."""

    label: np.ndarray  # [H, W] uint8 class index
    part: np.ndarray  # [H, W] int32 part id; part_material[part] is its material
    part_material: list[int]
    horizon: float
    vanish_x: float
    road_bottom: tuple[float, float]  # left, right road edge at the bottom row
    depth: np.ndarray  # [H, W] float32: ground depth t (rows below the horizon), facade depth elsewhere
    height: np.ndarray  # [H, W] float32: height above the ground in camera heights (facades)

    def new_part(self, material: int) -> int:
        self.part_material.append(material)
        return len(self.part_material) - 1


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _fill(lay: Layout, mask: np.ndarray, cls: int, part: int, y0: int = 0, x0: int = 0) -> None:
    """Paint ``mask`` (a window of the image starting at row y0, column x0) with class and part."""
    h, w = mask.shape
    lay.label[y0 : y0 + h, x0 : x0 + w][mask] = cls
    lay.part[y0 : y0 + h, x0 : x0 + w][mask] = part


def _rect(lay: Layout, x0: float, x1: float, y0: float, y1: float, cls: int, part: int) -> None:
    h, w = lay.label.shape
    xa, xb = min(max(math.floor(x0 + 0.5), 0), w), min(max(math.floor(x1 + 0.5), 0), w)
    ya, yb = min(max(math.floor(y0 + 0.5), 0), h), min(max(math.floor(y1 + 0.5), 0), h)
    if xb == xa and 0 <= x0 < w:  # keep thin things at least one pixel wide
        xb = min(xa + 1, w)
    if yb == ya and 0 <= y0 < h:
        yb = min(ya + 1, h)
    lay.label[ya:yb, xa:xb] = cls
    lay.part[ya:yb, xa:xb] = part


def _ellipse(lay: Layout, cx: float, cy: float, rx: float, ry: float, cls: int, part: int) -> None:
    h, w = lay.label.shape
    xa, xb = int(max(0, np.floor(cx - rx))), int(min(w, np.ceil(cx + rx) + 1))
    ya, yb = int(max(0, np.floor(cy - ry))), int(min(h, np.ceil(cy + ry) + 1))
    if xa >= xb or ya >= yb:
        return
    yy, xx = _grid(h, w)
    dy = (yy[ya:yb, xa:xb] - cy) / max(ry, 0.5)
    dx = (xx[ya:yb, xa:xb] - cx) / max(rx, 0.5)
    _fill(lay, dx * dx + dy * dy <= 1.0, cls, part, ya, xa)


def _side(lay: Layout, rng: np.random.Generator, style: GeometryStyle, sign: int, outer_b: float) -> None:
    """Facades along one side of the street (sign -1: left, +1: right). ``outer_b`` is the x where the
    ground beyond the sidewalk/terrain begins, at the bottom row."""
    h, w = lay.label.shape
    h0, vx = lay.horizon, lay.vanish_x
    yy, xx = _grid(h, w)
    cols = np.arange(w, dtype=np.float32) + 0.5
    span = (outer_b - vx) * sign  # > 0
    on_side = (cols - vx) * sign > 0.5
    t_col = np.where(on_side, (cols - vx) * sign / max(span, 1e-3), 0.0).astype(np.float32)
    t_col = np.maximum(t_col, 1e-3)
    ground = h0 + t_col * (h - h0)  # unclipped ground row of the facade at each column
    # Segments along the street in "distance" u = 1/t, each a building, a hedge/park or open ground.
    u_col = 1.0 / t_col
    u = float(u_col[on_side].min()) if on_side.any() else 1.0
    bounds, kinds, heights = [], [], []
    while u < (h - h0) and len(bounds) < 24:
        u = u * (1.0 + rng.uniform(0.25, 0.9)) + rng.uniform(0.1, 0.6)
        bounds.append(u)
        kinds.append(int(rng.choice(3, p=style.segment_probs)))
        heights.append(rng.uniform(*style.building_height))
    seg = np.minimum(np.searchsorted(np.asarray(bounds), u_col), len(bounds) - 1)
    kind = np.asarray(kinds)[seg]
    top_k = np.asarray(heights)[seg]
    hedge = kind == 1
    # hedges and parks: lower, with a ragged top
    ragged = 0.15 * np.sin(cols * rng.uniform(0.3, 0.9) + rng.uniform(0, 6)) + 0.1 * np.sin(cols * 1.7)
    top_k = np.where(hedge, 0.3 * top_k * (1.0 + ragged), top_k)
    top = h0 - top_k * t_col * (h - h0)
    inside = on_side[None, :] & (yy >= top[None, :]) & (yy < ground[None, :])
    building_parts = np.asarray([lay.new_part(M_FACADE) for _ in bounds])
    hedge_part = lay.new_part(M_HEDGE)
    is_b = inside & (kind == 0)[None, :]
    is_h = inside & hedge[None, :]
    is_open = on_side[None, :] & (kind == 2)[None, :] & (yy >= h0) & (yy < ground[None, :])
    lay.label[is_b] = BUILDING
    np.copyto(lay.part, building_parts[seg][None, :], where=is_b)
    _fill(lay, is_h, VEGETATION, hedge_part)
    _fill(lay, is_open, TERRAIN, P_TERRAIN)
    facade = is_b | is_h | is_open
    np.copyto(lay.depth, t_col[None, :], where=facade)
    np.copyto(lay.height, (ground[None, :] - yy) / (t_col[None, :] * (h - h0)), where=facade)
    # a fence in front of part of the facades
    if rng.random() < style.fence_prob:
        ua = rng.uniform(1.0, 3.0)
        ub = ua * rng.uniform(2.0, 6.0)
        fence_h = rng.uniform(0.5, 1.0)
        cols_f = on_side & (u_col >= ua) & (u_col <= ub)
        ftop = ground - fence_h * t_col * (h - h0)
        m = cols_f[None, :] & (yy >= ftop[None, :]) & (yy < ground[None, :])
        _fill(lay, m, FENCE, lay.new_part(M_FENCE))
        np.copyto(lay.depth, t_col[None, :], where=m)


def _tree(lay: Layout, rng: np.random.Generator, x: float, y: float, s: float) -> None:
    """A tree standing at (x, y); ``s`` = pixels per camera height at that depth."""
    trunk_h = rng.uniform(0.9, 1.6) * s
    trunk_w = max(1.0, rng.uniform(0.06, 0.1) * s)
    _rect(lay, x - trunk_w / 2, x + trunk_w / 2, y - trunk_h, y, VEGETATION, lay.new_part(M_TRUNK))
    crown = lay.new_part(M_CROWN)
    r = rng.uniform(0.45, 0.9) * s
    cy = y - trunk_h - 0.5 * r
    for _ in range(int(rng.integers(3, 6))):
        _ellipse(lay, x + rng.normal(0, 0.35) * r, cy + rng.normal(0, 0.3) * r,
                 r * rng.uniform(0.55, 0.9), r * rng.uniform(0.5, 0.8), VEGETATION, crown)


def _pole(lay: Layout, rng: np.random.Generator, x: float, y: float, s: float) -> None:
    pole_h = rng.uniform(1.8, 3.2) * s
    pole_w = max(2.5, 0.1 * s)
    top = y - pole_h
    _rect(lay, x - pole_w / 2, x + pole_w / 2, top, y, POLE, lay.new_part(M_POLE))
    if rng.random() < 0.6:  # traffic sign: a plate or a disc near the top
        sz = max(3.0, rng.uniform(0.35, 0.55) * s)
        cy = top + rng.uniform(0.1, 0.4) * pole_h
        part = lay.new_part(M_SIGN)
        if rng.random() < 0.5:
            _rect(lay, x - sz / 2, x + sz / 2, cy - sz / 2, cy + sz / 2, SIGN, part)
        else:
            _ellipse(lay, x, cy, sz / 2, sz / 2, SIGN, part)


def _person(lay: Layout, rng: np.random.Generator, x: float, y: float, s: float) -> None:
    ph = rng.uniform(1.0, 1.25) * s
    bw = ph * rng.uniform(0.24, 0.32)
    legs, torso = lay.new_part(M_CLOTH), lay.new_part(M_CLOTH)
    stride = rng.uniform(0.0, 0.12) * ph
    lw = 0.38 * bw
    _rect(lay, x - stride / 2 - lw, x - stride / 2 + 0.1 * lw, y - 0.5 * ph, y, PERSON, legs)
    _rect(lay, x + stride / 2 - 0.1 * lw, x + stride / 2 + lw, y - 0.5 * ph, y, PERSON, legs)
    _rect(lay, x - bw / 2, x + bw / 2, y - 0.84 * ph, y - 0.46 * ph, PERSON, torso)
    _ellipse(lay, x, y - 0.91 * ph, 0.09 * ph, 0.09 * ph, PERSON, lay.new_part(M_SKIN))


def _car(lay: Layout, rng: np.random.Generator, x: float, y: float, cw: float) -> None:
    body = lay.new_part(M_CAR_BODY)
    bh = cw * rng.uniform(0.4, 0.5)
    _rect(lay, x - cw / 2, x + cw / 2, y - bh - 0.06 * cw, y - 0.08 * cw, CAR, body)
    # cabin: a trapezoid above the body
    h, w = lay.label.shape
    ch = cw * rng.uniform(0.3, 0.4)
    y1 = y - bh - 0.06 * cw
    y0 = y1 - ch
    ya, yb = int(max(0, np.floor(y0 + 0.5))), int(min(h, np.floor(y1 + 0.5)))
    if yb > ya:
        yy, xx = _grid(h, w)
        frac = (yy[ya:yb] - y0) / ch  # 0 at the roof, 1 at the body
        half = cw * (0.32 + 0.14 * frac)
        m = np.abs(xx[ya:yb] - x) <= half
        _fill(lay, m, CAR, body, ya)
        glass = np.abs(xx[ya:yb] - x) <= half - 0.06 * cw
        glass &= (frac > 0.15) & (frac < 0.92)
        _fill(lay, glass, CAR, lay.new_part(M_CAR_GLASS), ya)
    lamp = lay.new_part(M_CAR_LAMP)
    ly = y - bh * 0.75
    _rect(lay, x - cw / 2 + 0.04 * cw, x - cw / 2 + 0.18 * cw, ly, ly + 0.1 * cw, CAR, lamp)
    _rect(lay, x + cw / 2 - 0.18 * cw, x + cw / 2 - 0.04 * cw, ly, ly + 0.1 * cw, CAR, lamp)
    wheel = lay.new_part(M_WHEEL)
    _rect(lay, x - cw / 2 + 0.04 * cw, x - cw / 2 + 0.2 * cw, y - 0.1 * cw, y, CAR, wheel)
    _rect(lay, x + cw / 2 - 0.2 * cw, x + cw / 2 - 0.04 * cw, y - 0.1 * cw, y, CAR, wheel)


def make_layout(rng: np.random.Generator, size: tuple[int, int], style: GeometryStyle) -> Layout:
    """Draw a scene's geometry (labels and parts) from ``style`` with ``rng``."""
    h, w = size
    yy, xx = _grid(h, w)
    h0 = rng.uniform(*style.horizon) * h
    vx = w * (0.5 + rng.uniform(-0.12, 0.12))
    lay = Layout(
        label=np.full((h, w), SKY, np.uint8), part=np.full((h, w), P_SKY, np.int32),
        part_material=[M_SKY, M_ROAD, M_SIDEWALK, M_TERRAIN, M_SKY],  # part 0 is never drawn
        horizon=h0, vanish_x=vx, road_bottom=(0.0, 0.0),
        depth=np.zeros((h, w), np.float32), height=np.zeros((h, w), np.float32),
    )
    road_l = vx - w * rng.uniform(*style.road_half_width)
    road_r = vx + w * rng.uniform(*style.road_half_width)
    lay.road_bottom = (road_l, road_r)
    side_l = road_l - w * rng.uniform(*style.sidewalk_width)
    side_r = road_r + w * rng.uniform(*style.sidewalk_width)
    terr_l = side_l - (w * rng.uniform(0.08, 0.3) if rng.random() < style.terrain_prob else 0.0)
    terr_r = side_r + (w * rng.uniform(0.08, 0.3) if rng.random() < style.terrain_prob else 0.0)

    # ground: road, sidewalks, terrain strips (rows below the horizon)
    t = np.clip((yy - h0) / (h - h0), 0.0, None)
    below = yy >= h0
    np.copyto(lay.depth, t, where=below)
    rel = np.where(below, (xx - vx) / np.maximum(t, 1e-6), 0.0)  # x position at the bottom row
    for lo, hi, cls, part in (
        (terr_l, terr_r, TERRAIN, P_TERRAIN),
        (side_l, side_r, SIDEWALK, P_SIDEWALK),
        (road_l, road_r, ROAD, P_ROAD),
    ):
        m = below & (rel >= lo - vx) & (rel < hi - vx)
        _fill(lay, m, cls, part)
    _side(lay, rng, style, -1, terr_l)
    _side(lay, rng, style, +1, terr_r)

    # objects, drawn far to near: (depth t, kind, lateral position at the bottom row)
    objs: list[tuple[float, int, float]] = []

    def depth(near: float = 1.15, far: float = 0.06) -> float:
        return float(np.exp(rng.uniform(np.log(far), np.log(near))))

    for _ in range(int(rng.integers(style.trees[0], style.trees[1] + 1))):
        side = rng.choice([-1, 1])
        edge = side_l if side < 0 else side_r
        objs.append((depth(), 0, edge + side * rng.uniform(-0.08, 0.02) * w))
    for _ in range(int(rng.integers(style.poles[0], style.poles[1] + 1))):
        side = rng.choice([-1, 1])
        edge = road_l if side < 0 else road_r
        objs.append((depth(far=0.18), 1, edge + side * rng.uniform(0.02, 0.1) * w))
    for _ in range(int(rng.integers(style.people[0], style.people[1] + 1))):
        side = rng.choice([-1, 1])
        a, b = (side_l, road_l) if side < 0 else (road_r, side_r)
        objs.append((depth(far=0.18), 2, rng.uniform(a, b)))
    for _ in range(int(rng.integers(style.cars[0], style.cars[1] + 1))):
        lane = rng.uniform(-0.8, 0.8)
        objs.append((depth(), 3, 0.5 * (road_l + road_r) + lane * 0.5 * (road_r - road_l)))
    objs.sort(key=lambda o: o[0])
    for t_obj, kind, xb in objs:
        x = vx + t_obj * (xb - vx)
        y = h0 + t_obj * (h - h0)
        s = t_obj * (h - h0)  # pixels per camera height at this depth
        if kind == 0:
            _tree(lay, rng, x, y, s)
        elif kind == 1:
            _pole(lay, rng, x, y, s)
        elif kind == 2:
            _person(lay, rng, x, y, s)
        else:
            cw = t_obj * (road_r - road_l) * rng.uniform(0.2, 0.26)
            _car(lay, rng, x, y, cw)
    return lay


# ------------------------------------------------------------------------------------------- painting
def _rgb(*hexes: str) -> np.ndarray:
    return np.array([[int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4)] for h in hexes], np.float32)


@dataclass(frozen=True)
class Look:
    """How a domain paints: candidate colours per material, texture strength, and the camera model
    (all zero for the clean "game" look)."""

    palette: dict[int, np.ndarray]  # material -> [n, 3] candidate RGB colours in [0, 1]
    colour_jitter: float  # per-part multiplicative colour jitter (std)
    textures: float  # strength of the procedural textures (0 = flat)
    exposure: float = 0.05  # std of the per-image log exposure
    colour_cast: float = 0.0  # std of the per-image, per-channel log gain
    gamma: float = 0.0  # std of the per-image log gamma
    light_gradient: tuple[float, float] = (0.0, 0.0)  # strength range of a linear light gradient
    shadow_prob: float = 0.0  # probability of a cast shadow over the ground and facades
    blur: tuple[float, float] = (0.0, 0.0)  # range of the side tap of a separable 3-tap blur
    vignetting: tuple[float, float] = (0.0, 0.0)
    noise: tuple[float, float] = (0.0, 0.0)  # range of the sensor noise std
    blockiness: float = 0.0  # max blend weight of 8x8 block means (JPEG-like)

    @functools.cached_property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """Palette as arrays: colours [materials, max choices, 3] and choice counts [materials]."""
        n = max(self.palette) + 1
        counts = np.array([len(self.palette[m]) for m in range(n)])
        colours = np.zeros((n, counts.max(), 3), np.float32)
        for m in range(n):
            colours[m, : counts[m]] = self.palette[m]
        return colours, counts


_CAR_COLOURS = ("c8c8c8", "2a2a2e", "8a1c1c", "1c3a7a", "e6e6e6", "6e6e72", "3c5a3c", "b08a2a")
_CLOTHES = ("1e1e28", "3c3c64", "7a2a2a", "a0a0a0", "2a4a6e", "5a4a3a", "c86e32", "e0e0e0")

SOURCE_LOOK = Look(
    palette={
        M_ROAD: _rgb("5a5468"), M_SIDEWALK: _rgb("b496b8", "a88ca8"), M_TERRAIN: _rgb("8cd264"),
        M_SKY: _rgb("5a9ae6", "6eaaf0"), M_FACADE: _rgb("c89650", "8c8cb4", "b45a46", "a0a0aa", "dcc896"),
        M_HEDGE: _rgb("3c961e"), M_CROWN: _rgb("46a028", "329628"), M_TRUNK: _rgb("6e4628"),
        M_FENCE: _rgb("be9664"), M_POLE: _rgb("46464f", "5a5a64"),
        M_SIGN: _rgb("e6dc14", "1e50c8", "dc2828"),
        M_SKIN: _rgb("e6b48c", "8c5a3c"), M_CLOTH: _rgb(*_CLOTHES),
        M_CAR_BODY: _rgb(*_CAR_COLOURS), M_CAR_GLASS: _rgb("5a78a0"), M_CAR_LAMP: _rgb("f01e1e"),
        M_WHEEL: _rgb("141414"),
    },
    colour_jitter=0.06, textures=0.35,
)
TARGET_LOOK = Look(
    palette={
        M_ROAD: _rgb("646070", "5c5a64"), M_SIDEWALK: _rgb("a08ca0", "9a8c96"),
        M_TERRAIN: _rgb("8cb45a", "96aa5a"), M_SKY: _rgb("7ab0e8", "8cb4e6", "a0bedc"),
        M_FACADE: _rgb("b49664", "8c8ca0", "a05a4b", "a0a0a0", "c8b48c"),
        M_HEDGE: _rgb("3c6e1e"), M_CROWN: _rgb("467828", "3c6e28"), M_TRUNK: _rgb("50402d"),
        M_FENCE: _rgb("a08c6e", "8c8a82"), M_POLE: _rgb("3a3c3a", "4a4640"),
        M_SIGN: _rgb("d2c81e", "2850b4", "c83232"),
        M_SKIN: _rgb("c8a082", "6e4632"), M_CLOTH: _rgb(*_CLOTHES),
        M_CAR_BODY: _rgb(*_CAR_COLOURS), M_CAR_GLASS: _rgb("3c4a5a"), M_CAR_LAMP: _rgb("c82828"),
        M_WHEEL: _rgb("1a1a1a"),
    },
    colour_jitter=0.10, textures=1.0, exposure=0.15, colour_cast=0.08, gamma=0.12,
    light_gradient=(0.1, 0.35), shadow_prob=0.6, blur=(0.12, 0.3), vignetting=(0.1, 0.35),
    noise=(0.005, 0.025), blockiness=0.3,
)


@functools.lru_cache(maxsize=4)
def _noise_bank(h: int, w: int) -> np.ndarray:
    """Fixed noise tiles [6, 2h, 2w]: white grain (3 independent tiles, one per colour channel) and
    smooth fractal noise at 4, 12 and 40 px, each zero mean and unit std. Built once per size from a
    fixed seed; images cut random windows out of them."""
    rng = np.random.default_rng(20230402)
    H, W = 2 * h, 2 * w
    tiles = [rng.standard_normal((H, W)).astype(np.float32) for _ in range(3)]
    for cell in (4, 12, 40):
        gh, gw = H // cell + 2, W // cell + 2
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        ys = np.arange(H, dtype=np.float32) / cell
        xs = np.arange(W, dtype=np.float32) / cell
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
        a, b = g[y0][:, x0], g[y0][:, x0 + 1]
        c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
        tile = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
        tiles.append((tile - tile.mean()) / tile.std())
    return np.stack(tiles)


GRAIN, SMALL, MID, BIG = 0, 3, 4, 5  # tile indices (0..2: grain)


def _noise(rng: np.random.Generator, h: int, w: int, tile: int, channels: int = 1) -> np.ndarray:
    """A random [h, w] window of a noise tile ([h, w, channels] of the grain tiles if channels > 1)."""
    bank = _noise_bank(h, w)
    y, x = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
    if channels > 1:
        return np.moveaxis(bank[tile : tile + channels, y : y + h, x : x + w], 0, -1)
    return bank[tile, y : y + h, x : x + w]


def _blur3(img: np.ndarray, a: np.float32) -> np.ndarray:
    """Separable [a, 1 - 2a, a] blur of [H, W, C] with edge replication."""
    for axis in (0, 1):
        x = np.moveaxis(img, axis, 0)
        neighbours = np.empty_like(x)
        np.add(x[:-2], x[2:], out=neighbours[1:-1])
        np.add(x[0], x[1], out=neighbours[0])
        np.add(x[-2], x[-1], out=neighbours[-1])
        neighbours *= a
        neighbours += (1 - 2 * a) * x
        img = np.moveaxis(neighbours, 0, axis)
    return img


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)  # np.mod(x, 1) is ~30x slower


def _scale(shade: np.ndarray, factor, where: np.ndarray) -> None:
    """shade *= factor where ``where`` (factor: array or scalar)."""
    shade *= np.where(where, factor, np.float32(1.0))


def paint(lay: Layout, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Render a layout in a domain's look: [H, W, 3] uint8.

    Everything per pixel is single-channel until the end: a colour per part (plus two paint-only
    parts, lane markings and window glass) times a shading field plus a grey additive field, times a
    per-image colour gain; then gamma, blur, noise and blockiness on the RGB image."""
    h, w = lay.label.shape
    yy, xx = _grid(h, w)
    f32 = np.float32
    # one colour per part: a palette choice for its material, jittered
    mats = np.asarray(lay.part_material, dtype=np.int64)
    table, counts = look.table
    choice = (rng.random(len(mats)) * counts[mats]).astype(np.int64)
    colours = table[mats, choice] * (1.0 + rng.normal(0.0, look.colour_jitter, (len(mats), 3))).astype(f32)
    mark_part, glass_part = len(mats), len(mats) + 1
    textured = look.textures >= 0.5
    marking = f32(rng.uniform(0.6, 0.8) if textured else 0.85)
    glass = rng.uniform(0.15, 0.35) * np.array([0.9, 1.0, 1.1]) if textured else np.array([0.45, 0.6, 0.8])
    colours = np.concatenate([colours, np.full((1, 3), marking, f32), glass[None].astype(f32)])

    mat = mats.astype(np.int8)[lay.part]
    sky, road, facade, fence = mat == M_SKY, mat == M_ROAD, mat == M_FACADE, mat == M_FENCE
    sidewalk, terrain = mat == M_SIDEWALK, mat == M_TERRAIN
    ground = road | sidewalk | terrain
    veg = lay.label == VEGETATION
    h0, t, fh = lay.horizon, lay.depth, lay.height
    # perspective coordinates: distance along the street and lateral position (at the bottom row)
    u = 1.0 / np.maximum(t, f32(0.02))
    lateral = (xx - f32(lay.vanish_x)) * u / f32(w)
    part = lay.part.copy()
    shade = np.ones((h, w), f32)
    add = None
    # sky: lighter towards the horizon
    _scale(shade, f32(1.08) - f32(0.2 / max(h0, 1.0)) * np.clip(f32(h0) - yy, 0, None), sky)
    # lane markings: a dashed centre line and solid edge lines
    centre = 0.5 * (lay.road_bottom[0] + lay.road_bottom[1])
    half = 0.5 * (lay.road_bottom[1] - lay.road_bottom[0]) / w
    lat_c = np.abs(lateral - f32((centre - lay.vanish_x) / w))
    dash = (lat_c < 0.008) & (_frac(u * f32(1.3) + f32(rng.uniform())) < 0.5)
    mark = road & (dash | (np.abs(lat_c - f32(half * 0.94)) < 0.006))
    part[mark] = mark_part
    # windows in perspective (height above the ground x distance along the street)
    win = facade & (fh > 0.7) & (_frac(fh * f32(rng.uniform(1.2, 2.0))) < 0.5)
    win &= _frac(u * f32(rng.uniform(2.0, 4.0))) < 0.55
    part[win] = glass_part
    wall = facade & ~win
    _scale(shade, f32(0.7), fence & (_frac(u * f32(rng.uniform(4.0, 8.0))) < 0.35))  # fence slats
    # shading: facades darker at the bottom, the ground darker far away
    _scale(shade, f32(0.88) + f32(0.03) * np.minimum(fh, 4), wall)
    _scale(shade, f32(0.92) + f32(0.08) * np.minimum(t, 1), ground)

    k = f32(look.textures)
    if k > 0:  # asphalt grain and patches, paving joints, grass, bricks, leaves, glass, clouds
        fine, small, mid, big = (_noise(rng, h, w, i) for i in (GRAIN, SMALL, MID, BIG))
        _scale(shade, 1 + k * (f32(0.06) * fine + f32(0.08) * mid), road & ~mark)
        paving = (_frac(u * f32(3.0)) < 0.12) | (_frac(lateral * f32(25)) < 0.1)
        _scale(shade, (1 + k * f32(0.05) * fine) * np.where(paving, 1 - f32(0.15) * k, f32(1)), sidewalk)
        _scale(shade, 1 + k * (f32(0.12) * fine + f32(0.1) * mid), terrain)
        bricks = _frac(fh * f32(8.0)) < 0.18
        mortar = np.where(bricks, 1 - f32(0.12) * k, f32(1))
        _scale(shade, (1 + k * (f32(0.05) * fine + f32(0.07) * big)) * mortar, wall)
        _scale(shade, 1 + k * f32(0.3) * small, win)
        _scale(shade, np.clip(1 + k * (f32(0.25) * small + f32(0.15) * fine + f32(0.1) * mid), 0.3, 2.0), veg)
        _scale(shade, 1 + k * f32(0.05) * fine, ~(sky | veg | facade | ground))
        cloud = np.where(sky, np.clip(f32(0.5) + f32(0.5) * big, 0, 1) * (f32(0.3) * k), f32(0))
        shade *= 1 - cloud
        add = f32(0.9) * cloud

    if look.shadow_prob > 0 and rng.random() < look.shadow_prob:  # a shadow wedge from one side
        side = f32(rng.choice([-1.0, 1.0]))
        offset, freq, phase = f32(rng.uniform(-0.3, 0.5)), f32(rng.uniform(0.5, 2.0)), f32(rng.uniform(0, 6))
        edge = offset + f32(0.04) * np.sin(u * freq + phase)
        _scale(shade, f32(rng.uniform(0.45, 0.7)), (side * lateral > edge) & (ground | facade))
    # illumination: a linear light gradient and vignetting, exposure and colour cast, gamma
    light = None
    if look.light_gradient[1] > 0:
        ang = rng.uniform(0, 2 * np.pi)
        strength = f32(rng.uniform(*look.light_gradient))
        light = 1.0 + strength * ((xx / w - 0.5) * f32(np.cos(ang)) + (yy / h - 0.5) * f32(np.sin(ang)))
    if look.vignetting[1] > 0:
        radius2 = (xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2
        vignette = 1.0 - f32(rng.uniform(*look.vignetting) * 2.0) * radius2
        light = vignette if light is None else light * vignette
    if light is not None:
        shade *= light
        if add is not None:
            add *= light
    img = np.take(colours, part, axis=0)
    img *= shade[..., None]
    if add is not None:
        img += add[..., None]
    img *= np.exp(rng.normal(0.0, look.exposure) + rng.normal(0.0, look.colour_cast, 3)).astype(f32)
    np.clip(img, 0.0, 1.0, out=img)
    if look.gamma:
        img **= f32(np.exp(rng.normal(0.0, look.gamma)))
    # optics and sensor: blur, noise, JPEG-like blockiness
    if look.blur[1] > 0:
        img = _blur3(img, f32(rng.uniform(*look.blur)))
    if look.noise[1] > 0:
        sigma = f32(rng.uniform(*look.noise))
        img += sigma * (_noise(rng, h, w, GRAIN)[..., None] + f32(0.5) * _noise(rng, h, w, GRAIN, channels=3))
    if look.blockiness > 0 and h % 8 == 0 and w % 8 == 0:
        blocks = img.reshape(h // 8, 8, w // 8, 8, 3)
        a = f32(rng.uniform(0.0, look.blockiness))
        means = blocks.sum(axis=1, keepdims=True).sum(axis=3, keepdims=True) / f32(64)
        blocks *= 1 - a
        blocks += a * means
        img = blocks.reshape(h, w, 3)
    img *= 255.0
    img += 0.5
    return np.clip(img, 0.0, 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------- public API
def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise DigaError(f"unknown synthetic domain {domain!r}; choose from {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise DigaError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def _seed_sequence(domain: str, split: str, index: int, seed: int) -> np.random.SeedSequence:
    if index < 0 or seed < 0:
        raise DigaError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.SeedSequence([int(seed), DOMAINS.index(domain), SPLITS.index(split), int(index)])


def render_scene(
    domain: str, split: str, index: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One scene of the built-in pair: (image [H, W, 3] uint8, label [H, W] uint8 train ids).
    A pure function of its arguments."""
    _check(domain, split)
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise DigaError(f"synthetic images must be at least 16 x 16, got {h} x {w}")
    geometry_seq, look_seq = _seed_sequence(domain, split, index, seed).spawn(2)
    style, look = (SOURCE_GEOMETRY, SOURCE_LOOK) if domain == "source" else (TARGET_GEOMETRY, TARGET_LOOK)
    lay = make_layout(np.random.default_rng(geometry_seq), (h, w), style)
    image = paint(lay, look, np.random.default_rng(look_seq))
    return image, lay.label


class _SceneCache:
    """Rendered scenes kept for the life of the process, shared by every dataset object (the stages of
    ``diga demo`` build new datasets over the same scenes; each would otherwise render them again),
    least recently used dropped first beyond ``budget`` bytes (the demo's 800 scenes of 128 x 256 take
    105 MB)."""

    def __init__(self, budget: int = 1 << 30) -> None:
        self.budget, self.used = budget, 0
        self.scenes: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        if key in self.scenes:
            self.scenes.move_to_end(key)
            return self.scenes[key]
        image, label = render_scene(*key)
        image.flags.writeable = label.flags.writeable = False  # shared by every later reader
        self.scenes[key] = image, label
        self.used += image.nbytes + label.nbytes
        while self.used > self.budget and len(self.scenes) > 1:
            _, (old_image, old_label) = self.scenes.popitem(last=False)
            self.used -= old_image.nbytes + old_label.nbytes
        return image, label


_SCENES = _SceneCache()


class SyntheticDomain(torch.utils.data.Dataset):
    """``num_images`` scenes of one domain and split. Items are dicts: ``image`` float32 [3, H, W] in
    [0, 1], ``label`` int64 [H, W] (when ``with_labels``), ``name``. A ``transform`` is called as
    ``image_u8, label_u8 = transform(image_u8, label_u8 or None)`` on the numpy arrays first."""

    def __init__(
        self,
        domain: str,
        split: str,
        num_images: int,
        seed: int = 0,
        size: tuple[int, int] = DEFAULT_SIZE,
        transform=None,
        with_labels: bool = True,
    ) -> None:
        _check(domain, split)
        if num_images < 1:
            raise DigaError(f"num_images must be positive, got {num_images}")
        if seed < 0:
            raise DigaError(f"seed must be non-negative, got {seed}")
        self.domain, self.split = domain, split
        self.num_images, self.seed = int(num_images), int(seed)
        self.size = (int(size[0]), int(size[1]))
        self.transform = transform
        self.with_labels = with_labels
        self.num_classes = CITYSCAPES19.num_classes

    def _scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return _SCENES.get((self.domain, self.split, index, self.seed, self.size))  # rendered once per process

    def __len__(self) -> int:
        return self.num_images

    def name(self, index: int) -> str:
        return f"{self.domain}_{self.split}_{index:05d}"

    @property
    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.num_images)]

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The untransformed uint8 image and label (None without labels), like the real datasets."""
        image, label = self._scene(index)
        return image, (label if self.with_labels else None)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, label = self.read(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        item = {
            "image": torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255.0),
            "name": self.name(index),
        }
        if self.with_labels:
            item["label"] = torch.from_numpy(np.array(label, dtype=np.int64))
        return item
