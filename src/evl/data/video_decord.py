"""The decord backend (optional, `pip install decord`): same interface and frame indices as PyAV."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from evl.data.video_base import Clip, VideoInfo, _assemble, _choose_indices
from evl.errors import VideoDecodeError

# ----------------------------------------------------------------------------- decord backend


class _decord_errors:
    """Context manager translating any decord/FFmpeg failure into VideoDecodeError.

    decord raises its own DECORDError (and sometimes RuntimeError/IndexError) with no stable type to
    catch, so everything except our own errors and argument errors is translated.
    """

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (VideoDecodeError, ValueError, KeyboardInterrupt)):
            return False
        if isinstance(exc, Exception):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VideoDecodeError(self.path, f"decord failed ({reason[:300]})") from None
        return False


def _open_decord(path: str) -> Any:
    """A decord VideoReader (single-threaded: one per DataLoader worker). Clear error if missing."""
    try:
        import decord
    except ImportError:
        raise VideoDecodeError(path, "backend 'decord' is not installed; `pip install decord` "
                                     "or use backend='pyav'") from None
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    if len(vr) == 0:
        raise VideoDecodeError(path, "the video stream holds no frames (empty or truncated file)")
    return vr


def _decord_info(vr: Any) -> VideoInfo:
    h, w = vr[0].shape[:2] if len(vr) else (0, 0)
    fps = float(vr.get_avg_fps() or 0.0) or 1.0
    n = len(vr)
    ts = vr.get_frame_timestamp(n - 1)
    duration = float(ts[1]) if ts[1] > 0 else n / fps
    return VideoInfo(num_frames=n, fps=fps, duration=duration, width=int(w), height=int(h))


def _load_clip_decord(path: str, num_frames: int, strategy: str, indices: Sequence[int] | None,
                      start: float | None, end: float | None, rng: random.Random | None) -> Clip:
    with _decord_errors(path):
        vr = _open_decord(path)
        info = _decord_info(vr)
        times = None
        if (start, end) != (None, None):
            ts = vr.get_frame_timestamp(list(range(info.num_frames)))[:, 0]
            times = [float(t - ts[0]) for t in ts]
        wanted = _choose_indices(path, info, times, num_frames, strategy, indices, start, end, rng)
        unique = sorted(set(wanted))
        batch = vr.get_batch(unique).asnumpy()
    pixels = dict(zip(unique, batch, strict=True))
    return _assemble(wanted, pixels, num_frames if indices is None else len(wanted), info)


def _verify_decord(path: str) -> VideoInfo:
    with _decord_errors(path):
        vr = _open_decord(path)
        info = _decord_info(vr)
        for s in range(0, info.num_frames, 32):
            vr.get_batch(list(range(s, min(s + 32, info.num_frames)))).asnumpy()
    return info


