"""The PyAV backend (the default): packet table, seek plan, frame-exact decoding (see `evl.data.video`)."""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evl.data.video_base import SEEK_OVERHEAD_FRAMES, SeekMode, VideoInfo
from evl.errors import VideoDecodeError

# ----------------------------------------------------------------------------- PyAV backend


@dataclass
class _PacketTable:
    """Presentation-order pts of every frame (empty if the container lacks pts) and keyframe ordinals."""

    pts: list[int]
    times: list[float]  # seconds from the first frame, per frame index
    keyframes: list[int]  # sorted frame indices of keyframes (always includes 0)
    count: int  # number of frame packets, with or without pts
    # with null (repeat) frames: for each presented frame, the ordinal of the coded frame it shows
    repeats: list[int] | None = None

    @property
    def presented(self) -> int:
        """Frames a player shows: the coded ones plus the repeats of null frames."""
        return len(self.repeats) if self.repeats is not None else self.count


# Per-process cache of packet tables: demuxing a long file costs a full read, and datasets revisit the
# same files every epoch. Plain data keyed by (path, size, mtime), so a rewritten file is re-read and
# a copy inherited by a forked DataLoader worker stays valid.
_TABLE_CACHE: OrderedDict[tuple[str, int, int], tuple[_PacketTable, VideoInfo]] = OrderedDict()
_TABLE_CACHE_SIZE = 4096


class _pyav_open:
    """Context manager: open `path` with PyAV, yield (container, first video stream), always close.

    Translates every FFmpeg/PyAV failure inside the block into VideoDecodeError with the reason.
    """

    def __init__(self, path: str):
        self.path = path
        self.container: Any = None

    def __enter__(self) -> tuple[Any, Any]:
        import av  # lazy: loads FFmpeg

        try:
            self.container = av.open(self.path, mode="r")
        except av.error.FFmpegError as e:
            raise VideoDecodeError(self.path, f"not a readable media file ({_ffmpeg_reason(e)})") from None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise VideoDecodeError(self.path, f"cannot open ({e})") from None
        fmt = self.container.format.name
        if fmt.endswith("_pipe") or fmt == "image2":   # png_pipe, jpeg_pipe, ...: one still image
            self.container.close()
            raise VideoDecodeError(self.path, f"a still image ({fmt.removesuffix('_pipe')}), not a video")
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams}) or ["none"]
            self.container.close()
            raise VideoDecodeError(self.path, f"no video stream (streams: {', '.join(kinds)})")
        stream = self.container.streams.video[0]
        stream.thread_type = "SLICE"  # one decoder per DataLoader worker; parallelism comes from workers
        stream.thread_count = 1
        return self.container, stream

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        import av

        if self.container is not None:
            self.container.close()
        if isinstance(exc, av.error.FFmpegError):
            raise VideoDecodeError(self.path, f"decoding failed ({_ffmpeg_reason(exc)})") from None
        if isinstance(exc, (OSError, EOFError)):
            raise VideoDecodeError(self.path, f"decoding failed ({exc})") from None
        return False


def _ffmpeg_reason(e: Exception) -> str:
    """FFmpeg's message without the file path PyAV appends (the path is already in the error)."""
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).split(": '")[0]


def _pyav_table(path: str) -> tuple[_PacketTable, VideoInfo]:
    """Packet table + info of `path`, from the cache or by demuxing (no decoding)."""
    st = Path(path).stat()
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    with _pyav_open(path) as (container, stream):
        table = _demux_table(container, stream, path)
        info = _pyav_info(container, stream, table, path)
    _TABLE_CACHE[key] = (table, info)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table, info


def _demux_table(container: Any, stream: Any, path: str) -> _PacketTable:
    """Demux the video stream's packets: pts per frame and keyframes, sorted by pts."""
    pts: list[int] = []
    key_pts: list[int] = []
    count = 0
    missing = False
    total = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at end of stream
            continue
        total += 1
        if packet.is_discard:  # outside an edit list: the decoder drops it, so it is no frame of ours
            continue
        count += 1
        if packet.pts is None:
            missing = True
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    if count == 0:
        raise VideoDecodeError(path, "the video stream holds no frames (empty or truncated file)")
    listed = int(stream.frames or 0)
    if missing or len(set(pts)) != len(pts):
        _check_tail(path, listed, total)
        return _PacketTable(pts=[], times=[], keyframes=[0], count=count)  # decode-and-count fallback
    pts.sort()
    tb = float(stream.time_base)
    rank = {p: i for i, p in enumerate(pts)}
    table = _PacketTable(pts=pts, times=[(p - pts[0]) * tb for p in pts],
                         keyframes=sorted({rank[p] for p in key_pts} | {0}), count=count)
    if listed > total:
        table.repeats = _null_frame_repeats(pts, tb, stream.average_rate or stream.guessed_rate, listed)
    _check_tail(path, listed, table.presented + total - count)
    return table


def _check_tail(path: str, listed: int, found: int) -> None:
    """The header's frame count against the frames found. A short tail (an AVI header that counts a
    frame more than it holds) is accepted; a file that really stops early (a cut-off download) is not."""
    if listed and listed - found > max(2, listed // 100):
        raise VideoDecodeError(path, f"the container lists {listed} frames but only {found} can be read; "
                                     "the file is truncated — re-download or re-encode it")


def _null_frame_repeats(pts: list[int], tb: float, rate: Any, listed: int) -> list[int] | None:
    """Constant-rate containers (AVI) store "show the previous frame again" as empty chunks, which the
    demuxer drops, leaving gaps of whole frame durations in the pts. Returns, per presented frame, the
    coded frame it shows (the last one at or before it), up to the header's count; None when the pts
    are not on a frame grid with gaps (a variable-frame-rate file keeps ordinal indexing)."""
    if not rate or float(rate) <= 0:
        return None
    step = 1.0 / (float(rate) * tb)   # pts units per frame
    ticks = [(p - pts[0]) / step for p in pts]
    if step < 1 or any(abs(t - round(t)) > 1e-6 for t in ticks):
        return None
    ticks_int = [round(t) for t in ticks]
    if ticks_int[-1] + 1 == len(pts):   # no gap: nothing is repeated
        return None
    span = max(ticks_int[-1] + 1, listed)   # null frames after the last coded one repeat it too
    return [bisect.bisect_right(ticks_int, i) - 1 for i in range(span)]


def _pyav_info(container: Any, stream: Any, table: _PacketTable, path: str) -> VideoInfo:
    """VideoInfo from the packet table; fps from the container's rate or, failing that, from the pts."""
    n = table.presented
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise VideoDecodeError(path, f"video stream has no frame size ({width}x{height})")
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if fps <= 0 and len(table.times) > 1 and table.times[-1] > 0:
        fps = (len(table.times) - 1) / table.times[-1]
    if fps <= 0:
        fps = 1.0  # a single still frame without a rate: any positive value keeps arithmetic defined
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    else:
        duration = n / fps
    return VideoInfo(num_frames=n, fps=fps, duration=duration, width=width, height=height)


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames of `stream` from the container's current position, in presentation order."""
    for packet in container.demux(stream):
        yield from packet.decode()


def _rgb_converter() -> Callable[[Any], np.ndarray]:
    """frame → (H, W, 3) uint8 RGB through one swscale context reused for the whole call, turned
    upright as a player shows it (the display matrix, e.g. a phone video recorded in portrait).

    `frame.to_ndarray(format="rgb24")` builds a new swscale context for every frame, which costs
    more than decoding a small frame (3-4x slower on 64x64 clips).
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()

    def convert(frame: Any) -> np.ndarray:
        rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
        # `rotation`: degrees the display turns the picture counterclockwise (FFmpeg's convention)
        quarter = round(frame.rotation / 90) % 4 if frame.rotation else 0
        return np.rot90(rgb, quarter) if quarter else rgb

    return convert


def _plan_runs(wanted: list[int], keyframes: list[int], mode: SeekMode) -> list[tuple[int, list[int]]]:
    """Group sorted wanted indices into runs (start keyframe, wanted frames decoded from it).

    Cost model: a run decodes from its keyframe to its last wanted frame. A next wanted frame joins
    the current run when its keyframe is within SEEK_OVERHEAD_FRAMES of the last frame the run
    already decodes ("auto"), or only when it is in the same keyframe group ("seek").
    """
    if mode == "sequential":
        return [(0, list(wanted))]
    overhead = SEEK_OVERHEAD_FRAMES if mode == "auto" else 0
    runs: list[tuple[int, list[int]]] = []
    for w in wanted:
        k = keyframes[bisect.bisect_right(keyframes, w) - 1]
        if runs and k <= runs[-1][1][-1] + overhead:
            runs[-1][1].append(w)
        else:
            runs.append((k, [w]))
    return runs


class _SeekMissed(Exception):
    """A seek did not reach the wanted frames: the demuxer landed elsewhere than a clean keyframe at or
    before them (e.g. MPEG-TS), or the frames decoded after it do not carry the listed timestamps."""


def _decode_pyav(path: str, table: _PacketTable, wanted: list[int], mode: SeekMode) -> dict[int, np.ndarray]:
    """RGB arrays (H, W, 3) for every index in sorted `wanted`, decoded frame-exactly."""
    if not table.pts:
        return _decode_counting(path, wanted)
    runs = _plan_runs(wanted, table.keyframes, mode)
    out: dict[int, np.ndarray] = {}
    to_rgb = _rgb_converter()
    try:
        with _pyav_open(path) as (container, stream):
            for key, run in runs:
                seeked = key > 0
                if seeked:
                    container.seek(table.pts[key], stream=stream, backward=True, any_frame=False)
                _decode_run(container, stream, table, run, out, path, seeked, to_rgb)
    except _SeekMissed:
        # seeking cannot be trusted for this file: decode from the start, as `sequential` does
        out.clear()
        with _pyav_open(path) as (container, stream):
            _decode_run(container, stream, table, wanted, out, path, False, to_rgb)
    return out


def _decode_run(container: Any, stream: Any, table: _PacketTable, run: list[int],
                out: dict[int, np.ndarray], path: str, check_landing: bool,
                to_rgb: Callable[[Any], np.ndarray]) -> None:
    """Decode forward, keeping the frames whose pts is wanted. After a seek, the first frame must be
    a keyframe at or before the run's first wanted frame, else frames could be missed or corrupt."""
    want = {table.pts[i]: i for i in run if i not in out}
    if not want:
        return
    first_needed, last_needed = min(want), max(want)
    known_keys = {table.pts[k] for k in table.keyframes}
    first = check_landing
    for frame in _frames(container, stream):
        if frame.pts is None:
            continue
        if first and (frame.pts > first_needed or frame.pts not in known_keys or not frame.key_frame):
            raise _SeekMissed()
        first = False
        if frame.pts in want:
            out[want.pop(frame.pts)] = to_rgb(frame)
        if frame.pts >= last_needed or not want:
            break
    if want:
        if check_landing:
            # after a seek some containers (e.g. MPEG-4 in AVI) give the decoded frames other timestamps
            # than the packet table: the frames exist, the seek path cannot find them. Decode from the start.
            raise _SeekMissed()
        missing = sorted(want.values())
        raise VideoDecodeError(path, f"frames {missing[:5]} are listed in the container but could not be "
                                     f"decoded (of {table.count}); the file is probably truncated or corrupt")


def _decode_counting(path: str, wanted: list[int]) -> dict[int, np.ndarray]:
    """Fallback for containers without pts: decode from the start and count frames in output order."""
    want = set(wanted)
    out: dict[int, np.ndarray] = {}
    last = max(wanted)
    to_rgb = _rgb_converter()
    with _pyav_open(path) as (container, stream):
        for i, frame in enumerate(_frames(container, stream)):
            if i in want:
                out[i] = to_rgb(frame)
            if i >= last:
                break
    if len(out) != len(want):
        missing = sorted(want - set(out))
        raise VideoDecodeError(path, f"frames {missing[:5]} could not be decoded; the file is probably "
                                     "truncated or corrupt")
    return out


