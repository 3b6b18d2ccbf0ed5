"""Video decoding and frame sampling behind one small interface (PyAV default, decord optional).

Why plain functions: decoders hold FFmpeg state that must not cross process boundaries, and
DataLoader workers are processes. Every call here opens the file, decodes what it needs and closes
it, so nothing is shared and nothing leaks; create nothing at import time.

**Frame index definition** (the same for every backend, constant and variable frame rate): frame
``i`` is the ``i``-th frame of the first video stream in *presentation order*, i.e. the frames sorted
by presentation timestamp (pts), counting from 0. For a constant-frame-rate video this equals
``round(t * fps)`` for a frame shown at ``t`` seconds; for a variable-frame-rate (VFR) video it is
the ordinal, not a time, so ``indices`` never skips or duplicates a frame. Times (``start``/``end``
windows) are measured in seconds from the first frame's pts, using each frame's real pts, so VFR
windows are exact too.

**Padding**: a video with fewer frames than requested yields every real frame followed by copies of
the last real frame (pixels and index repeated) with ``frame_mask`` False. Copies rather than zeros
because models that ignore the mask (tubelets spanning two frames, frame pooling) then see plausible
content instead of black frames that normalise to a strong artificial signal.

**Seeking**: the PyAV backend first demuxes the packet table (cheap: no decoding) to learn each
frame's pts and the keyframes, then plans *runs*: seek to the keyframe at or before a wanted frame and
decode forward; a wanted frame that is reachable more cheaply by decoding on than by seeking again
joins the current run. Frames are matched by pts, so results are frame-exact with B-frames and with
seeks that land on an earlier keyframe than asked; a seek that lands anywhere else (MPEG-TS has no
index) is detected and the clip is decoded from the start instead. Containers without pts (raw
H.264) are decoded from the start, counting frames. Packet tables are cached per process, keyed by
(path, size, mtime), so later epochs skip the demux pass.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from evl.data.frame_cache import FrameCache, file_key
from evl.data.video_base import (
    BACKENDS,
    STRATEGIES,
    Backend,
    Clip,
    SeekMode,
    Strategy,
    VideoInfo,
    _assemble,
    _check_file,
    _choose_indices,
    sample_indices,
)
from evl.data.video_decord import (
    _decord_errors,
    _decord_info,
    _load_clip_decord,
    _open_decord,
    _verify_decord,
)
from evl.data.video_pyav import _decode_pyav, _frames, _pyav_open, _pyav_table
from evl.errors import VideoDecodeError

# the public decoding interface; the types and sampling live in video_base, the backends beside it
__all__ = ["BACKENDS", "STRATEGIES", "Backend", "Clip", "SeekMode", "Strategy", "VideoInfo", "load_clip",
           "probe_video", "sample_indices", "verify_video"]


# ----------------------------------------------------------------------------- public API


def probe_video(path: str | Path, backend: str = "pyav") -> VideoInfo:
    """Frame count, fps, duration and size. PyAV reads the packet table (exact count, no decoding)."""
    path = _check_file(path, backend)
    if backend == "decord":
        with _decord_errors(path):
            vr = _open_decord(path)
            return _decord_info(vr)
    return _pyav_table(path)[1]


def load_clip(path: str | Path, num_frames: int = 8, strategy: str = "uniform", *,
              indices: Sequence[int] | None = None, start: float | None = None,
              end: float | None = None, rng: random.Random | None = None,
              backend: str = "pyav", seek: SeekMode = "auto", cache: FrameCache | None = None) -> Clip:
    """Decode `num_frames` frames of `path` sampled by `strategy` (or exactly `indices`).

    `start`/`end` (seconds) restrict sampling to a time window. Explicit `indices` bypass sampling
    (any order, repeats allowed, no padding). `seek` chooses the PyAV decode plan: "auto" (cheapest),
    "seek" (seek before every keyframe group) or "sequential" (decode from the start); all three give
    identical frames, the option exists for benchmarks and tests. Every failure is a VideoDecodeError.
    `cache` (PyAV only; `evl.data.frame_cache`): decoded frames found there are not decoded again, and
    the frames decoded here are added to it.
    """
    path = _check_file(path, backend)
    if seek not in ("auto", "seek", "sequential"):
        raise ValueError(f"seek must be 'auto', 'seek' or 'sequential', got {seek!r}")
    if backend == "decord":
        return _load_clip_decord(path, num_frames, strategy, indices, start, end, rng)
    table, info = _pyav_table(path)
    # with null frames the presented frames sit on the constant-rate grid: windows by fps
    times = table.times if table.pts and table.repeats is None else None
    wanted = _choose_indices(path, info, times, num_frames, strategy, indices, start, end, rng)
    coded = wanted if table.repeats is None else [table.repeats[w] for w in wanted]
    needed = sorted(set(coded))
    if cache is None:
        pixels = _decode_pyav(path, table, needed, seek)
    else:
        key = file_key(path)
        pixels = cache.get(key, needed)
        missing = [i for i in needed if i not in pixels]
        if missing:
            decoded = _decode_pyav(path, table, missing, seek)
            cache.put(key, decoded)
            pixels.update(decoded)
    pixels = {w: pixels[c] for w, c in zip(wanted, coded, strict=True)}
    return _assemble(wanted, pixels, num_frames if indices is None else len(wanted), info)


def verify_video(path: str | Path, backend: str = "pyav") -> VideoInfo:
    """Open and decode every frame; raise VideoDecodeError if anything is wrong.

    Used by `evl data check`: a file that passes here will decode in training. Checks that the
    number of decoded frames equals the number of frames the container announces (a truncated file
    whose index survived decodes fewer) and that decoding raises nothing. Returns the probed info.
    """
    path = _check_file(path, backend)
    if backend == "decord":
        return _verify_decord(path)
    table, info = _pyav_table(path)
    with _pyav_open(path) as (container, stream):
        decoded = sum(1 for _ in _frames(container, stream))
    if decoded != table.count:
        raise VideoDecodeError(path, f"decoded {decoded} frames but the container holds {table.count}; "
                                     "the file is probably truncated or corrupt — re-encode or re-download it")
    return info


