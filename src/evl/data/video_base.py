"""What the video backends share: the `VideoInfo` / `Clip` types, frame sampling, and the helpers that
check a file, choose the frame indices and assemble a clip (see `evl.data.video` for the definitions of
frame index, padding and windows)."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from evl.errors import VideoDecodeError

Backend = Literal["pyav", "decord"]
Strategy = Literal["uniform", "random"]
SeekMode = Literal["auto", "seek", "sequential"]

BACKENDS: tuple[str, ...] = ("pyav", "decord")
STRATEGIES: tuple[str, ...] = ("uniform", "random")

# Decoding this many frames costs about as much as one seek + decoder flush + B-frame refill;
# the planner keeps decoding forward instead of seeking when the gap is smaller than this.
SEEK_OVERHEAD_FRAMES = 4


@dataclass
class VideoInfo:
    """What `probe_video` learns about a file without decoding pixels. `width`/`height` are the coded
    size; decoded frames come out upright (rotation metadata applied, PyAV backend), so a portrait
    phone video has them swapped."""

    num_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int


@dataclass
class Clip:
    """Sampled frames of one video.

    `frames` is uint8 (T, C, H, W) RGB; `frame_mask[t]` is False where frame t is padding (a copy of
    the last real frame); `indices[t]` is the source frame index (see module docstring) of frame t.
    """

    frames: torch.Tensor
    frame_mask: torch.Tensor
    indices: list[int]
    fps: float
    num_source_frames: int

    @property
    def num_valid(self) -> int:
        """Number of real (non-padding) frames."""
        return int(self.frame_mask.sum())


# ----------------------------------------------------------------------------- sampling


def sample_indices(num_source_frames: int, num_frames: int, strategy: str = "uniform", *,
                   rng: random.Random | None = None, fps: float | None = None,
                   start: float | None = None, end: float | None = None) -> list[int]:
    """Pick `num_frames` sorted source frame indices.

    The range (all frames, or those shown in ``[start, end)`` seconds, frame i shown at ``i / fps``)
    is cut into `num_frames` equal segments; "uniform" takes each segment's middle frame
    (deterministic: evaluation), "random" a uniformly random frame of each segment (training; `rng`
    or the `random` module, which PyTorch's DataLoader seeds differently in every worker).
    A range shorter than `num_frames` returns all of its frames, *fewer* than asked: the caller pads
    (`load_clip` does, with a mask), because repeating frames would hide that the video is short.
    """
    lo, hi = _window_by_fps(num_source_frames, fps, start, end)
    return _sample_range(lo, hi, num_frames, strategy, rng)


def _window_by_fps(num_source_frames: int, fps: float | None, start: float | None,
                   end: float | None) -> tuple[int, int]:
    """Frame range [lo, hi) for a time window on a constant-rate timeline (frame i at i / fps)."""
    if num_source_frames <= 0:
        raise ValueError(f"num_source_frames must be positive, got {num_source_frames}")
    if start is None and end is None:
        return 0, num_source_frames
    if fps is None or fps <= 0:
        raise ValueError(f"a time window (start={start}, end={end}) needs a positive fps, got {fps}")
    times = [i / fps for i in range(num_source_frames)]
    return _window_by_times(times, start, end)


def _window_by_times(times: Sequence[float], start: float | None, end: float | None) -> tuple[int, int]:
    """Frame range [lo, hi) of the frames whose time t satisfies start <= t < end (sorted `times`).

    An `end` past the video's end is clamped (annotations often overshoot by a fraction of a second);
    a window holding no frame at all is an error, since sampling it would silently return nothing.
    """
    s = 0.0 if start is None else float(start)
    e = math.inf if end is None else float(end)
    if s < 0 or e <= s or math.isnan(s) or math.isnan(e):
        raise ValueError(f"time window must satisfy 0 <= start < end, got start={start}, end={end}")
    lo = bisect.bisect_left(times, s - 1e-9)
    hi = bisect.bisect_left(times, e - 1e-9)
    if hi <= lo:
        last = times[-1] if times else 0.0
        raise ValueError(f"time window [{s}, {e}) s holds no frame; frames span 0 to {last:.3f} s")
    return lo, hi


def _sample_range(lo: int, hi: int, num_frames: int, strategy: str,
                  rng: random.Random | None) -> list[int]:
    """Segment-based sampling inside [lo, hi); see `sample_indices`."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    n = hi - lo
    if n <= num_frames:
        return list(range(lo, hi))
    seg = n / num_frames
    if strategy == "uniform":
        return [lo + int(seg * k + seg / 2) for k in range(num_frames)]
    r = rng if rng is not None else random
    out = []
    for k in range(num_frames):
        a, b = int(round(seg * k)), int(round(seg * (k + 1)))  # segments tile [0, n) exactly
        out.append(lo + r.randrange(a, max(b, a + 1)))
    return out


# ----------------------------------------------------------------------------- shared helpers


def _check_file(path: str | Path, backend: str) -> str:
    """Fail early with a specific reason for the cheap-to-detect cases and bad arguments."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(p, "file does not exist")
    if p.is_dir():
        raise VideoDecodeError(p, "path is a directory, not a video file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(p, "file is empty (0 bytes)")
    return str(p)


def _choose_indices(path: str, info: VideoInfo, times: Sequence[float] | None, num_frames: int,
                    strategy: str, indices: Sequence[int] | None, start: float | None,
                    end: float | None, rng: random.Random | None) -> list[int]:
    """Explicit indices (validated) or sampled ones; a bad window names the file."""
    n = info.num_frames
    if indices is not None:
        if (start, end) != (None, None):
            raise ValueError("pass either explicit indices or a start/end window, not both "
                             f"(got indices and start={start}, end={end})")
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("indices is empty; pass at least one frame index or use num_frames")
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise VideoDecodeError(path, f"frame indices {bad[:5]} out of range: the video has {n} frames "
                                         f"(valid 0..{n - 1})")
        return idx
    try:
        if times is not None:
            lo, hi = _window_by_times(times, start, end) if (start, end) != (None, None) else (0, n)
        else:
            lo, hi = _window_by_fps(n, info.fps, start, end)
    except ValueError as e:
        raise VideoDecodeError(path, str(e)) from None
    return _sample_range(lo, hi, num_frames, strategy, rng)


def _assemble(wanted: list[int], pixels: dict[int, np.ndarray], length: int, info: VideoInfo) -> Clip:
    """Stack decoded frames in `wanted` order and pad to `length` by repeating the last frame."""
    arrays = [pixels[i] for i in wanted]
    pad = length - len(wanted)
    idx = list(wanted) + [wanted[-1]] * pad
    arrays += [arrays[-1]] * pad
    # transpose in numpy: torch's threaded copy spins badly on busy machines (5 ms vs 0.07 ms here)
    frames = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
    mask = torch.zeros(length, dtype=torch.bool)
    mask[: len(wanted)] = True
    return Clip(frames=frames, frame_mask=mask, indices=idx, fps=info.fps, num_source_frames=info.num_frames)


