"""Procedural training and held-out clips for the tiny-motion model: one shape on a soft background,
moving from its first frame in a way that the first frame (and the motion bucket id) determines.

- Direction: the hue of the shape's colour (hue h -> angle 2 pi h, 0 = right, counter-clockwise on screen).
- Speed: BASE_SPEED pixels per frame (at 32 px) times motion / 127, where motion is SVD's motion bucket id.
- Kind: circles translate; squares translate and rotate (counter-clockwise); triangles translate and grow.
- Every shape bounces off the frame's edges (mirror reflection of its centre's path).

Reproducible: a clip is a pure function of (stream, seed, index, frames, size, motion). The training stream
and the held-out stream use different numpy seed sequences, so their scenes are disjoint by construction.
"""

import colorsys
import math
from dataclasses import dataclass

import numpy as np

TRAIN, HELDOUT = 0, 1  # streams
BASE_SPEED = 1.5  # pixels per frame at 32 px, for motion bucket 127
DEFAULT_MOTION = 127
KINDS = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # rendered at 4x and box-filtered: anti-aliased edges, sub-pixel motion


@dataclass(frozen=True)
class Scene:
    kind: str
    colour: tuple[float, float, float]  # RGB in [0, 1], saturated
    hue: float  # [0, 1): the direction of motion
    radius: float  # in units of the frame side (circumradius; half side for squares)
    start: tuple[float, float]  # centre (x, y) in units of the frame side
    angle: float  # initial rotation, radians
    bg: tuple[float, float, float]  # background base colour
    bg_grad: tuple[float, float, float]  # background gradient amplitude per channel
    grad_angle: float  # direction of the background gradient


def random_scene(rng: np.random.Generator) -> Scene:
    kind = KINDS[int(rng.integers(len(KINDS)))]
    hue = float(rng.random())
    colour = colorsys.hsv_to_rgb(hue, float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.8, 1.0)))
    radius = float(rng.uniform(0.11, 0.18))
    start = tuple(float(v) for v in rng.uniform(0.2, 0.8, size=2))
    bg = colorsys.hsv_to_rgb(float(rng.random()), float(rng.uniform(0.0, 0.35)), float(rng.uniform(0.12, 0.5)))
    return Scene(kind=kind, colour=tuple(colour), hue=hue, radius=radius, start=start,
                 angle=float(rng.uniform(0, 2 * math.pi)), bg=tuple(bg),
                 bg_grad=tuple(float(v) for v in rng.uniform(-0.12, 0.12, size=3)),
                 grad_angle=float(rng.uniform(0, 2 * math.pi)))


def scene_rng(stream: int, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, index])


def fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Mirror x into [lo, hi] (a bouncing path)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, (lo + hi) / 2)
    t = np.mod(x - lo, 2 * span)
    return lo + np.where(t > span, 2 * span - t, t)


def trajectory(scene: Scene, frames: int, size: int, motion: float = DEFAULT_MOTION):
    """Per frame: centre x, y (pixels), radius (pixels), angle (radians)."""
    t = np.arange(frames, dtype=np.float64)
    speed = BASE_SPEED * size / 32 * motion / DEFAULT_MOTION
    theta = 2 * math.pi * scene.hue
    radius = scene.radius * size * (1 + 0.06 * t if scene.kind == "triangle" else np.ones_like(t))
    # bounce off the edges: the centre stays within [r, size - r] of the largest radius
    margin = float(radius.max()) * (1.0 if scene.kind == "circle" else 1.2)
    x = fold(scene.start[0] * size + speed * math.cos(theta) * t, margin, size - margin)
    y = fold(scene.start[1] * size - speed * math.sin(theta) * t, margin, size - margin)  # screen y is down
    angle = scene.angle + (0.25 * t if scene.kind == "square" else 0 * t)
    return x, y, radius, angle


def polygon_mask(px, py, cx, cy, r, angle, sides):
    """Inside a regular polygon with circumradius r (centre cx, cy), as half-plane tests."""
    apothem = r * math.cos(math.pi / sides)
    inside = np.ones(px.shape, dtype=bool)
    for k in range(sides):
        a = angle + (2 * k + 1) * math.pi / sides  # edge normal direction
        inside &= (px - cx) * math.cos(a) - (py - cy) * math.sin(a) <= apothem
    return inside


def render(scene: Scene, frames: int, size: int, motion: float = DEFAULT_MOTION) -> np.ndarray:
    """uint8 [F, size, size, 3]."""
    s = SUPERSAMPLE
    coords = (np.arange(size * s) + 0.5) / s
    py, px = np.meshgrid(coords, coords, indexing="ij")
    u = (np.arange(size) + 0.5) / size - 0.5
    gy, gx = np.meshgrid(u, u, indexing="ij")
    ramp = gx * math.cos(scene.grad_angle) - gy * math.sin(scene.grad_angle)  # [-0.7, 0.7]
    bg = np.asarray(scene.bg)[None, None] + ramp[..., None] * np.asarray(scene.bg_grad)[None, None] * 2
    colour = np.asarray(scene.colour)[None, None]
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f, (cx, cy, r, a) in enumerate(zip(*trajectory(scene, frames, size, motion), strict=True)):
        if scene.kind == "circle":
            inside = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
        elif scene.kind == "square":
            inside = polygon_mask(px, py, cx, cy, r * math.sqrt(2), a, 4)
        else:
            inside = polygon_mask(px, py, cx, cy, r * 1.3, a, 3)
        alpha = inside.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        frame = bg * (1 - alpha) + colour * alpha
        out[f] = np.clip(np.round(frame * 255), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    scene: Scene
    motion: int
    seed: int
    index: int


def make_clip(stream: int, seed: int, index: int, frames: int = 8, size: int = 32,
              motion: int = DEFAULT_MOTION) -> Clip:
    scene = random_scene(scene_rng(stream, seed, index))
    return Clip(render(scene, frames, size, motion), scene, motion, seed, index)


def training_batch(step: int, batch: int, frames: int = 8, size: int = 32, seed: int = 0,
                   motion_range: tuple[int, int] = (48, 208)) -> tuple[np.ndarray, np.ndarray]:
    """Fresh clips for one training step: (uint8 [B, F, H, W, 3], motion bucket ids [B]). Reproducible per step."""
    rng = np.random.default_rng([TRAIN, seed, step, 1 << 20])
    motions = rng.integers(motion_range[0], motion_range[1] + 1, size=batch)
    clips = [make_clip(TRAIN, seed, step * batch + i, frames, size, int(m)).frames for i, m in enumerate(motions)]
    return np.stack(clips), motions


def heldout(n: int, seed: int = 0, frames: int = 8, size: int = 32, motion: int = DEFAULT_MOTION) -> list[Clip]:
    """The held-out clips: a stream the training never draws from."""
    return [make_clip(HELDOUT, seed, i, frames, size, motion) for i in range(n)]
