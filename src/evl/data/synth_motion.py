"""SynthVL's event timing and object placement: when each event happens in a clip, how far an action goes,
and where objects start so that every trajectory stays inside the frame without overlapping another."""

from __future__ import annotations

import math

import numpy as np

from evl.data.synth_render import EXTENT, GROW_FACTOR, ROTATION_DEGREES, SHRINK_FACTOR


def event_windows(n: int, frames: int, short_prob: float, rng: np.random.Generator,
                   long_range: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """n non-overlapping [start, end) windows in time order; some only 2–4 frames long, the others
    `long_range` frames (default T/4..T/2)."""
    long_lo, long_hi = long_range or (max(4, frames // 4), max(5, frames // 2))
    lengths = [int(rng.integers(2, 5)) if rng.random() < short_prob else int(rng.integers(long_lo, long_hi + 1))
               for _ in range(n)]
    lengths = [min(x, frames) for x in lengths]
    while sum(lengths) > frames:  # shorten the longest until everything fits (never below 2)
        lengths[int(np.argmax(lengths))] -= 1
    free = frames - sum(lengths)
    lead = 1 if free > 0 else 0  # show the state before the first event when there is room
    gaps = rng.multinomial(free - lead, np.full(n + 1, 1.0 / (n + 1)))
    gaps[0] += lead
    windows, t = [], 0
    for k in range(n):
        t += int(gaps[k])
        windows.append((t, t + lengths[k]))
        t += lengths[k]
    return windows


def event_amount(verb: str, shape: str, size: int, rng: np.random.Generator) -> float:
    """How far/much an action goes: pixels for motion, a scale factor for size, degrees for rotation."""
    if verb.startswith("move_"):
        return int(round(rng.uniform(0.25, 0.35) * size))
    if verb == "bounce":
        return int(round(0.2 * size))
    if verb == "grow":
        return GROW_FACTOR
    if verb == "shrink":
        return SHRINK_FACTOR
    if verb == "rotate":
        return ROTATION_DEGREES[shape]
    return 0


def trajectory_offsets(verb: str, amount: float) -> tuple[float, float, float, float]:
    """(dx_min, dx_max, dy_min, dy_max) of an object's centre relative to its start position."""
    return {
        "move_left": (-amount, 0, 0, 0), "move_right": (0, amount, 0, 0),
        "move_up": (0, 0, -amount, 0), "move_down": (0, 0, 0, amount), "bounce": (0, 0, -amount, 0),
    }.get(verb, (0, 0, 0, 0))


def place_objects(objs: list[dict], events: list[dict], size: int, rng: np.random.Generator, tries: int = 64) -> None:
    """Choose start positions keeping every trajectory inside the frame, greedily avoiding overlaps.

    Each object draws `tries` candidate positions at once and takes the first whose trajectory box
    does not touch an already placed one (or the least overlapping), so objects stay separable.
    """
    placed: list[np.ndarray] = []
    for obj, ev in zip(objs, events, strict=True):
        reach = math.ceil(obj["radius"] * (GROW_FACTOR if ev["verb"] == "grow" else 1.0) * EXTENT)
        dx0, dx1, dy0, dy1 = trajectory_offsets(ev["verb"], ev["amount"])
        xs = uniform_ints(rng, reach - dx0, size - 1 - reach - dx1, tries, size)
        ys = uniform_ints(rng, reach - dy0, size - 1 - reach - dy1, tries, size)
        boxes = np.stack([xs + dx0 - reach, xs + dx1 + reach, ys + dy0 - reach, ys + dy1 + reach], axis=1)
        cost = np.zeros(tries)
        for other in placed:
            w = np.minimum(boxes[:, 1], other[1]) - np.maximum(boxes[:, 0], other[0]) + 2
            h = np.minimum(boxes[:, 3], other[3]) - np.maximum(boxes[:, 2], other[2]) + 2
            cost += np.clip(w, 0, None) * np.clip(h, 0, None)
        k = int(np.argmin(cost))  # first minimum: the first non-overlapping candidate if any
        obj["x"], obj["y"] = int(xs[k]), int(ys[k])
        placed.append(boxes[k])


def uniform_ints(rng: np.random.Generator, lo: float, hi: float, n: int, size: int) -> np.ndarray:
    """n integers in [lo, hi]; the frame centre when the range is empty (very small frames)."""
    lo, hi = int(math.ceil(lo)), int(math.floor(hi))
    if hi < lo:
        return np.full(n, size // 2)
    return rng.integers(lo, hi + 1, n)
