"""SynthVL rendering: turn a clip's structured metadata into uint8 frames with vectorised numpy.

Kept apart from the planner (synthetic.py) and the text generator (synth_text.py) so each can be
read alone. Rendering is a pure function of the clip metadata and its own random stream, which is
what lets worker processes re-render any clip from `(seed, index)` without shipping frames around.

Speed: shape masks are computed once per (shape, radius, angle) and cached; a frame is drawn by
pasting a handful of cached boolean masks, so there are no per-pixel Python loops.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: Saturated object colours, far from the low-saturation background so colour is a clear signal.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (35, 85, 240),
    "yellow": (240, 225, 40),
    "purple": (175, 50, 230),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

#: Rotation used by the "rotate" verb: half of each shape's symmetry period, so the end pose differs
#: as much as possible from the start pose (a square turned by 90° would look unchanged).
ROTATION_DEGREES: dict[str, int] = {"square": 45, "triangle": 60, "cross": 45, "star": 36}
GROW_FACTOR = 1.6
SHRINK_FACTOR = 0.5
#: Masks extend a little beyond the nominal radius (square corners); placement uses the same margin.
EXTENT = 1.1


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float) -> np.ndarray:
    """Inside test for a regular polygon with circumradius `radius`, one vertex pointing up."""
    inside = np.ones(u.shape, dtype=bool)
    apothem = radius * math.cos(math.pi / sides)
    for k in range(sides):
        # edge normals sit halfway between vertices; vertex 0 points up (−v in image coordinates)
        phi = -math.pi / 2 + math.pi / sides + 2 * math.pi * k / sides
        inside &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return inside


@lru_cache(maxsize=8192)
def shape_mask(shape: str, radius_halfpx: int, angle_deg: int) -> np.ndarray:
    """Boolean mask (2k+1, 2k+1) of `shape`, centred, radius `radius_halfpx / 2` px, rotated.

    Arguments are quantised integers so the cache stays small and results are bit-exact.
    """
    radius = max(radius_halfpx / 2.0, 0.5)
    half = int(math.ceil(radius * EXTENT)) + 1
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    theta = math.radians(angle_deg)
    # rotate the sampling grid by −θ, which rotates the shape by +θ
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    if shape == "circle":
        mask = u * u + v * v <= radius * radius
    elif shape == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= radius * 0.75
    elif shape == "triangle":
        # shifted down by a quarter of the circumradius so the bounding box, not the centroid, is centred
        mask = _polygon(u, v - radius * 0.275, 3, radius * 1.1)
    elif shape == "cross":
        arm = radius * 0.32
        mask = ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    elif shape == "star":
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(u, -v)  # 0 = pointing up
        # radius oscillates between an inner and the outer radius five times around the circle
        reach = radius * (0.45 + 0.55 * np.abs(np.cos(2.5 * phi)) ** 3)
        mask = rho <= reach
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def progress(t: int, start: int, end: int) -> float:
    """Fraction of an event done at frame t: 0 before `start`, 1 from `end - 1` on (end exclusive).

    The first frame inside the window already shows movement, so even a 2-frame event changes pixels.
    """
    if t < start:
        return 0.0
    if t >= end:
        return 1.0
    return (t - start + 1) / (end - start)


def object_state(obj: dict, event: dict, t: int) -> tuple[float, float, float, float, float]:
    """(x, y, radius, angle_deg, alpha) of one object at frame t, from its single event."""
    x, y, r, angle, alpha = float(obj["x"]), float(obj["y"]), float(obj["radius"]), 0.0, 1.0
    p = progress(t, event["start"], event["end"])
    verb, amount = event["verb"], event["amount"]
    if verb == "move_left":
        x -= amount * p
    elif verb == "move_right":
        x += amount * p
    elif verb == "move_up":
        y -= amount * p
    elif verb == "move_down":
        y += amount * p
    elif verb == "bounce":
        y -= amount * math.sin(math.pi * p)
    elif verb == "grow":
        r *= 1 + (amount - 1) * p
    elif verb == "shrink":
        r *= 1 + (amount - 1) * p
    elif verb == "rotate":
        angle = amount * p
    elif verb == "appear":
        alpha = p
    elif verb == "disappear":
        alpha = 1 - p
    return x, y, r, angle, alpha


def paste(frame: np.ndarray, mask: np.ndarray, cx: float, cy: float, rgb: np.ndarray, alpha: float) -> None:
    """Blend `rgb` into `frame` (H, W, 3 float32) where `mask`, centred at (cx, cy), clipped to the frame."""
    h, w = frame.shape[:2]
    half = mask.shape[0] // 2
    x0, y0 = int(round(cx)) - half, int(round(cy)) - half
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + mask.shape[1], w), min(y0 + mask.shape[0], h)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sub = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    region = frame[fy0:fy1, fx0:fx1]
    if alpha >= 1.0:
        region[sub] = rgb
    else:
        region[sub] = alpha * rgb + (1 - alpha) * region[sub]


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation textured background (H, W, 3 float32) that differs per clip.

    Two random gratings plus static pixel noise, shared across channels (so it stays grey-ish)
    with a small per-clip tint: texture everywhere, but no saturated colour to confuse with objects.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 150)
    tex = np.zeros((size, size), dtype=np.float32)
    for _ in range(2):
        amp, freq = rng.uniform(6, 20), rng.uniform(1.5, 7.0)
        theta, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        tex += amp * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
    tex += rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(3, 9)
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    return base + tex[..., None] + tint


def draw_distractors(frames: np.ndarray, rng: np.random.Generator) -> None:
    """Small grey specks drifting at random: texture that moves but means nothing."""
    t, size = frames.shape[0], frames.shape[1]
    count = int(rng.integers(2, 7))
    pos = rng.uniform(0, size - 2, size=(count, 2))
    vel = rng.uniform(-1.0, 1.0, size=(count, 2))
    shade = rng.uniform(-50, 50, size=count).astype(np.float32)
    side = max(1, size // 32)
    for k in range(t):
        for j in range(count):
            x, y = (pos[j] + vel[j] * k) % (size - side)
            xi, yi = int(x), int(y)
            frames[k, yi:yi + side, xi:xi + side] += shade[j]


def render_frames(meta: dict, frames: int, size: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Render a clip (T, S, S, 3) uint8 from its structured metadata and its render random stream."""
    bg = background(rng, size)
    video = np.repeat(bg[None], frames, axis=0)
    draw_distractors(video, rng)
    event_of = {e["object"]: e for e in meta["events"]}
    for t in range(frames):
        for j, obj in enumerate(meta["objects"]):
            x, y, r, angle, alpha = object_state(obj, event_of[j], t)
            if alpha <= 0.0:
                continue
            mask = shape_mask(obj["shape"], int(round(r * 2)), int(round(angle)) % 360)
            paste(video[t], mask, x, y, np.asarray(obj["rgb"], dtype=np.float32), alpha)
    video += rng.standard_normal(video.shape, dtype=np.float32) * noise_std
    return np.clip(video, 0, 255).astype(np.uint8)
