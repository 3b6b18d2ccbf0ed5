"""Video decoding, frame sampling and transforms.

Test videos carry their frame index in the pixels: 16 blocks of 16x16 pixels, each black or white,
spell the index in binary. Blocks that big survive H.264/VP9 compression, so reading them back
proves which source frame was decoded (frame-exact), with B-frames, seeks and any container.
"""

from __future__ import annotations

import random
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evl.data import video_pyav as video_mod  # the PyAV backend's internals
from evl.data.transforms import (
    CLIP_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoTransform,
    center_crop,
    random_crop,
    resize_short_side,
    to_float_normalized,
)
from evl.data.video import Clip, VideoInfo, load_clip, probe_video, sample_indices, verify_video
from evl.data.video_writer import write_video
from evl.errors import VideoDecodeError

BACKENDS = ["pyav", "decord"]


# ----------------------------------------------------------------------------- helpers


def index_frame(i: int, size: int = 64) -> np.ndarray:
    """A (size, size, 3) frame whose 4x4 grid of blocks spells `i` in binary (bit k = block k)."""
    img = np.zeros((size, size, 3), np.uint8)
    b = size // 4
    for k in range(16):
        if (i >> k) & 1:
            r, c = divmod(k, 4)
            img[r * b:(r + 1) * b, c * b:(c + 1) * b] = 255
    return img


def read_index(frame: torch.Tensor) -> int:
    """Inverse of `index_frame` for a decoded (C, H, W) uint8 frame: block centres thresholded."""
    size = frame.shape[-1]
    b = size // 4
    gray = frame.float().mean(0)
    value = 0
    for k in range(16):
        r, c = divmod(k, 4)
        if gray[r * b + b // 4: (r + 1) * b - b // 4, c * b + b // 4: (c + 1) * b - b // 4].mean() > 128:
            value |= 1 << k
    return value


def indexed_video(path: Path, n: int, **kw) -> Path:
    return write_video(path, np.stack([index_frame(i) for i in range(n)]), **kw)


def decoded_indices(clip: Clip) -> list[int]:
    return [read_index(f) for f in clip.frames]


def write_raw(path: Path, frames: list[np.ndarray], codec: str, fmt: str | None = None,
              pts: list[int] | None = None, rate: int = 8, time_base: Fraction | None = None,
              options: dict | None = None, pix_fmt: str = "yuv420p") -> Path:
    """PyAV writer for cases write_video does not cover: other codecs/containers, hand-set pts (VFR)."""
    import av

    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        s.codec_context.gop_size = 4
        if time_base is not None:
            s.codec_context.time_base = time_base
        if codec == "libx264":
            s.options = {"crf": "18", "x264-params": "keyint=4:min-keyint=4:scenecut=0:bframes=0"}
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "plain": indexed_video(d / "plain.mp4", 30, gop=4),
        "bframes": indexed_video(d / "bframes.mp4", 40, gop=6, bframes=3),
        "long": indexed_video(d / "long.mp4", 300, gop=5, bframes=2),
        "short": indexed_video(d / "short.mp4", 5, gop=4),
    }


# ----------------------------------------------------------------------------- sample_indices


def test_uniform_takes_segment_middles():
    assert sample_indices(100, 4, "uniform") == [12, 37, 62, 87]
    assert sample_indices(8, 8, "uniform") == list(range(8))
    assert sample_indices(30, 3) == [5, 15, 25]


def test_random_stays_in_its_segment_and_is_seeded():
    a = sample_indices(100, 4, "random", rng=random.Random(0))
    assert a == sample_indices(100, 4, "random", rng=random.Random(0))
    for k, i in enumerate(a):
        assert 25 * k <= i < 25 * (k + 1)
    draws = {tuple(sample_indices(100, 4, "random", rng=random.Random(s))) for s in range(20)}
    assert len(draws) > 1


def test_short_range_returns_all_frames_unpadded():
    assert sample_indices(3, 8, "uniform") == [0, 1, 2]
    assert sample_indices(3, 8, "random", rng=random.Random(1)) == [0, 1, 2]


def test_time_window_by_fps():
    # frame i at i/10 s; [1.0, 2.0) holds frames 10..19
    assert sample_indices(50, 2, "uniform", fps=10, start=1.0, end=2.0) == [12, 17]
    assert sample_indices(50, 20, "uniform", fps=10, start=1.0, end=2.0) == list(range(10, 20))
    assert sample_indices(50, 5, fps=10, start=4.0) == [41, 43, 45, 47, 49]
    assert sample_indices(50, 1, fps=10, end=99.0) == [25]  # end clamped to the video


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_source_frames=0, num_frames=4), "num_source_frames"),
    (dict(num_source_frames=10, num_frames=0), "num_frames"),
    (dict(num_source_frames=10, num_frames=4, strategy="middle"), "unknown sampling strategy 'middle'"),
    (dict(num_source_frames=10, num_frames=4, start=1.0), "needs a positive fps"),
    (dict(num_source_frames=10, num_frames=4, fps=10, start=2.0, end=1.0), "0 <= start < end"),
    (dict(num_source_frames=10, num_frames=4, fps=10, start=-1.0), "0 <= start < end"),
    (dict(num_source_frames=10, num_frames=4, fps=10, start=5.0), "holds no frame"),
])
def test_sample_indices_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(**kwargs)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 64), strategy=st.sampled_from(["uniform", "random"]),
       seed=st.integers(0, 2**16))
def test_sample_indices_invariants(n, k, strategy, seed):
    idx = sample_indices(n, k, strategy, rng=random.Random(seed))
    assert len(idx) == min(n, k)
    assert idx == sorted(idx) and len(set(idx)) == len(idx)  # sorted, no repeats
    assert all(0 <= i < n for i in idx)


# ----------------------------------------------------------------------------- load_clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_clip_is_frame_exact(videos, backend):
    clip = load_clip(videos["plain"], num_frames=6, backend=backend)
    assert clip.indices == [2, 7, 12, 17, 22, 27]
    assert decoded_indices(clip) == clip.indices
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (6, 3, 64, 64)
    assert clip.frame_mask.dtype == torch.bool and clip.frame_mask.all()
    assert clip.fps == pytest.approx(8.0) and clip.num_source_frames == 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_clip_is_frame_exact_and_seeded(videos, backend):
    clip = load_clip(videos["bframes"], 8, "random", rng=random.Random(3), backend=backend)
    assert clip.indices == sample_indices(40, 8, "random", rng=random.Random(3))
    assert decoded_indices(clip) == clip.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_bframes_explicit_indices_any_order(videos, backend):
    want = [39, 0, 13, 13, 7, 26, 1]
    clip = load_clip(videos["bframes"], indices=want, backend=backend)
    assert clip.indices == want and decoded_indices(clip) == want
    assert clip.frame_mask.all() and clip.frames.shape[0] == len(want)


@pytest.mark.parametrize("seek", ["auto", "seek", "sequential"])
def test_seek_modes_agree_on_long_video(videos, seek):
    """Sparse sampling in a 300-frame, gop-5, B-frame video: the seek path equals decode-all."""
    want = [3, 77, 78, 150, 151, 152, 299, 200, 5]
    clip = load_clip(videos["long"], indices=want, seek=seek)
    assert decoded_indices(clip) == want
    reference = load_clip(videos["long"], indices=want, seek="sequential")
    assert torch.equal(clip.frames, reference.frames)


def test_long_video_uniform_all_backends_agree(videos):
    a = load_clip(videos["long"], 16, "uniform")
    b = load_clip(videos["long"], 16, "uniform", backend="decord")
    assert a.indices == b.indices == sample_indices(300, 16)
    assert decoded_indices(a) == decoded_indices(b) == a.indices


def test_plan_runs_groups_by_keyframe():
    keys = [0, 5, 10, 15, 20]
    assert video_mod._plan_runs([1, 12, 13, 21], keys, "seek") == [(0, [1]), (10, [12, 13]), (20, [21])]
    assert video_mod._plan_runs([1, 3, 7, 21], keys, "auto") == [(0, [1, 3, 7]), (20, [21])]
    assert video_mod._plan_runs([1, 21], keys, "sequential") == [(0, [1, 21])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_video_is_padded_with_last_frame(videos, backend):
    clip = load_clip(videos["short"], num_frames=8, backend=backend)
    assert clip.indices == [0, 1, 2, 3, 4, 4, 4, 4]
    assert clip.frame_mask.tolist() == [True] * 5 + [False] * 3
    assert clip.num_valid == 5 and clip.num_source_frames == 5
    for t in range(5, 8):
        assert torch.equal(clip.frames[t], clip.frames[4])
    assert decoded_indices(clip) == clip.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_window(videos, backend):
    # 30 frames at 8 fps: [1.0, 2.0) s holds frames 8..15
    clip = load_clip(videos["plain"], 4, start=1.0, end=2.0, backend=backend)
    assert clip.indices == [9, 11, 13, 15] and decoded_indices(clip) == clip.indices
    clip = load_clip(videos["plain"], 4, start=3.0, end=60.0, backend=backend)  # end clamped
    assert clip.indices == [24, 26, 27, 29] and decoded_indices(clip) == clip.indices
    with pytest.raises(VideoDecodeError, match=r"plain\.mp4.*holds no frame"):
        load_clip(videos["plain"], 4, start=10.0, end=12.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_indices_and_arguments(videos, backend):
    with pytest.raises(VideoDecodeError, match=r"plain\.mp4.*\[30\] out of range.*30 frames"):
        load_clip(videos["plain"], indices=[0, 30], backend=backend)
    with pytest.raises(VideoDecodeError, match="out of range"):
        load_clip(videos["plain"], indices=[-1], backend=backend)
    with pytest.raises(ValueError, match="indices is empty"):
        load_clip(videos["plain"], indices=[], backend=backend)
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        load_clip(videos["plain"], 4, "dense", backend=backend)
    with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
        load_clip(videos["plain"], backend="opencv")
    with pytest.raises(ValueError, match="either explicit indices or a start/end window"):
        load_clip(videos["plain"], indices=[1], start=1.0, backend=backend)
    with pytest.raises(ValueError, match="seek must be"):
        load_clip(videos["plain"], seek="fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_and_verify(videos, backend):
    expected = VideoInfo(num_frames=40, fps=8.0, duration=5.0, width=64, height=64)
    for fn in (probe_video, verify_video):
        info = fn(videos["bframes"], backend=backend)
        assert (info.num_frames, info.width, info.height) == (40, 64, 64)
        assert info.fps == pytest.approx(expected.fps) and info.duration == pytest.approx(5.0)


@pytest.mark.parametrize("name, codec, fmt", [
    ("v.mkv", "libx264", None), ("v.webm", "libvpx-vp9", None), ("v.avi", "mpeg4", None),
    ("v.ts", "libx264", None), ("v.mov", "mpeg4", None), ("v.h264", "libx264", "h264"),
])
def test_other_containers_and_codecs(tmp_path, name, codec, fmt):
    """Containers with and without an index (MPEG-TS seeks imprecisely, raw H.264 has no pts)."""
    path = write_raw(tmp_path / name, [index_frame(i) for i in range(20)], codec, fmt)
    want = [17, 2, 9, 10]
    for seek in ("seek", "sequential"):
        assert decoded_indices(load_clip(path, indices=want, seek=seek)) == want
    assert verify_video(path).num_frames == 20


def test_variable_frame_rate(tmp_path):
    """Frame index = ordinal in presentation order; windows use each frame's real pts."""
    pts = [0, 1, 2, 5, 6, 10, 11, 12, 20, 21]  # in 1/24 s
    path = write_raw(tmp_path / "vfr.mp4", [index_frame(i) for i in range(10)], "libx264", pts=pts,
                     rate=24, time_base=Fraction(1, 24))
    assert probe_video(path).num_frames == 10
    for backend in BACKENDS:
        clip = load_clip(path, 10, backend=backend)
        assert clip.indices == list(range(10)) and decoded_indices(clip) == clip.indices
        # frames at 5/24, 6/24, 10/24, 11/24, 12/24 s lie in [0.2, 0.6)
        clip = load_clip(path, 5, start=0.2, end=0.6, backend=backend)
        assert clip.indices == [3, 4, 5, 6, 7] and decoded_indices(clip) == clip.indices
    assert decoded_indices(load_clip(path, indices=[8, 3], seek="seek")) == [8, 3]


def _bump_avi_frame_count(path: Path, extra: int) -> Path:
    """Make an AVI's headers (avih dwTotalFrames, strh dwLength) list `extra` more frames than it holds."""
    import struct

    data = bytearray(path.read_bytes())
    for tag, offset in ((b"avih", 8 + 16), (b"strh", 8 + 32)):
        at = data.find(tag) + offset
        struct.pack_into("<I", data, at, struct.unpack_from("<I", data, at)[0] + extra)
    path.write_bytes(bytes(data))
    return path


def test_avi_header_listing_one_frame_more_than_it_holds_is_whole(tmp_path):
    """MPEG-4 AVIs whose header counts one frame more than the file holds play whole everywhere:
    a short tail is accepted, not reported as truncated."""
    path = _bump_avi_frame_count(write_raw(tmp_path / "v.avi", [index_frame(i) for i in range(12)], "mpeg4"), 1)
    assert verify_video(path).num_frames == 12
    clip = load_clip(path, 12)
    assert decoded_indices(clip) == clip.indices == list(range(12)) and bool(clip.frame_mask.all())


@pytest.mark.parametrize("codec, pix_fmt", [("cinepak", "rgb24"), ("mpeg4", "yuv420p")])
def test_avi_null_frames_repeat_the_previous_frame(tmp_path, codec, pix_fmt):
    """Constant-rate AVIs store "show the previous frame again" as empty chunks (the muxer writes one
    for every gap in the pts): frames are presented on the time grid, a null frame repeats the last
    coded one, and nothing is truncated. Here 5 coded frames are shown over 10 frame times."""
    shown_at = [0, 1, 4, 5, 9]
    path = write_raw(tmp_path / f"{codec}.avi", [index_frame(i) for i in range(5)], codec, pts=shown_at, rate=10,
                     time_base=Fraction(1, 10), pix_fmt=pix_fmt)
    assert probe_video(path).num_frames == 10
    assert verify_video(path).num_frames == 10
    clip = load_clip(path, indices=list(range(10)))
    assert decoded_indices(clip) == [0, 1, 1, 1, 2, 3, 3, 3, 3, 4]
    # windows follow the time grid: [0.2 s, 0.6 s) holds frame times 2..5, showing coded frames 1, 1, 2, 3
    assert decoded_indices(load_clip(path, 4, start=0.2, end=0.6)) == [1, 1, 2, 3]


def test_rotation_metadata_turns_frames_upright(tmp_path):
    """A phone video recorded upright is stored landscape with a display matrix saying "turn 90°
    clockwise"; frames must come out as a player shows them. The matrix is written into the mp4's
    track header by hand (PyAV cannot set it)."""
    import struct

    img = np.zeros((32, 64, 3), np.uint8)
    img[:16, :16] = 255   # a white block in the top-left corner of the stored picture
    path = write_raw(tmp_path / "phone.mp4", [img] * 4, "libx264")
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert data[at + 4] == 0   # version 0 header: the matrix is 44 bytes after the tag
    struct.pack_into(">9i", data, at + 44, 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    frame = load_clip(path, 1).frames[0]
    assert tuple(frame.shape) == (3, 64, 32)   # portrait
    gray = frame.float().mean(0)
    # turned clockwise: the stored top-left corner is now the top-right one
    assert gray[:16, 16:].mean() > 200 and gray[:16, :16].mean() < 50 and gray[48:].mean() < 50


def test_really_truncated_avi_is_still_reported(tmp_path):
    path = write_raw(tmp_path / "v.avi", [index_frame(i) for i in range(40)], "mpeg4")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="truncated"):
        verify_video(path)


# ----------------------------------------------------------------------------- bad input


def _audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for k in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, k * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, videos) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    data = videos["plain"].read_bytes()  # moov at the end: cut → no index
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    fast = write_raw(d / "faststart.mp4", [np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
                                           for _ in range(20)], "libx264", options={"movflags": "faststart"})
    fs = fast.read_bytes()  # moov first: cut → index lists frames whose data is missing
    (d / "truncated_faststart.mp4").write_bytes(fs[: len(fs) // 2])
    _audio_only(d / "audio_only.mp4")
    return {
        "missing": (d / "missing.mp4", "does not exist"),
        "directory": (d, "directory"),
        "empty": (d / "empty.mp4", "empty"),
        "text": (d / "text.mp4", "decord failed"),
        "truncated": (d / "truncated.mp4", "decord failed"),
        "truncated_faststart": (d / "truncated_faststart.mp4", "decord failed"),
        "audio_only": (d / "audio_only.mp4", "decord failed"),
    }


BAD = ["missing", "directory", "empty", "text", "truncated", "truncated_faststart", "audio_only"]
PYAV_REASONS = {"text": "not a readable media file", "truncated": "not a readable media file",
                "truncated_faststart": "truncated", "audio_only": r"no video stream \(streams: audio\)"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_raises_video_decode_error(bad_files, kind, backend):
    path, reason = bad_files[kind]
    if backend == "pyav":
        reason = PYAV_REASONS.get(kind, reason)
    calls = [lambda: probe_video(path, backend=backend), lambda: verify_video(path, backend=backend),
             lambda: load_clip(path, 4, backend=backend), lambda: load_clip(path, indices=[0], backend=backend)]
    for call in calls:
        with pytest.raises(VideoDecodeError, match=reason) as err:
            call()
        assert err.value.path == str(path) and str(path) in str(err.value)
        assert err.value.reason


def test_decord_missing_is_a_clear_error(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(VideoDecodeError, match="backend 'decord' is not installed"):
        load_clip(videos["plain"], backend="decord")


def test_table_cache_notices_rewritten_file(tmp_path):
    path = indexed_video(tmp_path / "v.mp4", 10)
    assert probe_video(path).num_frames == 10
    indexed_video(path, 14)
    assert probe_video(path).num_frames == 14
    assert decoded_indices(load_clip(path, indices=[13])) == [13]


# ----------------------------------------------------------------------------- transforms


def _ramp(t: int = 2, h: int = 6, w: int = 8) -> torch.Tensor:
    return torch.arange(t * 3 * h * w, dtype=torch.int64).remainder(256).to(torch.uint8).view(t, 3, h, w)


def test_resize_short_side_shapes_and_values():
    x = torch.zeros(2, 3, 36, 64, dtype=torch.uint8)
    assert resize_short_side(x, 18).shape == (2, 3, 18, 32)
    assert resize_short_side(x.transpose(2, 3), 18).shape == (2, 3, 32, 18)
    const = torch.full((1, 3, 40, 60), 77, dtype=torch.uint8)
    out = resize_short_side(const, 20)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 20, 30) and (out == 77).all()
    assert resize_short_side(const, 40) is const  # already the right size: untouched


def test_crops():
    x = _ramp(h=6, w=8)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 2:6])
    assert torch.equal(center_crop(x, (2, 8)), x[..., 2:4, :])
    crops = {tuple(random_crop(x, 4, random.Random(s))[0, 0, 0, :2].tolist()) for s in range(30)}
    assert len(crops) > 1
    c = random_crop(x, 4, random.Random(0))
    assert c.shape == (2, 3, 4, 4)
    # the same window for every frame and channel
    flat = x[0, 0]
    top, left = [(i, j) for i in range(3) for j in range(5) if torch.equal(flat[i:i + 4, j:j + 4], c[0, 0])][0]
    assert torch.equal(c, x[..., top:top + 4, left:left + 4])
    with pytest.raises(ValueError, match="larger than the frames"):
        center_crop(x, 7)
    with pytest.raises(ValueError, match="larger than the frames"):
        random_crop(x, (2, 9))


def test_normalization_values():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1).contiguous()
    out = to_float_normalized(x)
    assert out.dtype == torch.float32
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6)
        assert out[1, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)
    assert to_float_normalized(x, (0, 0, 0), (1, 1, 1))[1].eq(1).all()
    with pytest.raises(ValueError, match="3 values"):
        to_float_normalized(x, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="std must be positive"):
        to_float_normalized(x, CLIP_MEAN, (1, 0, 1))


def test_bad_transform_inputs():
    with pytest.raises(ValueError, match=r"uint8 tensor \(T, C, H, W\)"):
        resize_short_side(torch.zeros(3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        center_crop(torch.zeros(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="size must be positive"):
        resize_short_side(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="size must be positive"):
        VideoTransform(size=0)
    with pytest.raises(ValueError, match="train_scale"):
        VideoTransform(size=8, train_scale=0.5)


def test_video_transform_eval_and_train():
    x = torch.randint(0, 256, (4, 3, 36, 64), dtype=torch.uint8)
    ev = VideoTransform(size=32)
    out = ev(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, ev(x))  # deterministic
    assert torch.equal(out, to_float_normalized(center_crop(resize_short_side(x, 32), 32)))
    tr = VideoTransform(size=32, train=True)
    a, b = tr(x, random.Random(0)), tr(x, random.Random(0))
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert any(not torch.equal(tr(x, random.Random(s)), a) for s in range(1, 10))
    square = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(ev(square), to_float_normalized(square))  # eval keeps a square clip's pixels


def test_transform_on_decoded_clip(videos):
    clip = load_clip(videos["plain"], 4)
    out = VideoTransform(size=32)(clip.frames)
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()


def test_seek_path_decodes_few_frames(videos, monkeypatch):
    """Sparse indices in a long video must not decode everything (and must not fall back)."""
    counted = []
    real = video_mod._frames

    def counting(container, stream):
        for f in real(container, stream):
            counted.append(f.pts)
            yield f

    monkeypatch.setattr(video_mod, "_frames", counting)
    want = [150, 299]
    assert decoded_indices(load_clip(videos["long"], indices=want, seek="auto")) == want
    assert len(counted) < 20  # a fallback to decode-all would count 300
    counted.clear()
    load_clip(videos["long"], indices=want, seek="sequential")
    assert len(counted) == 300


def test_frames_a_seek_cannot_find_are_decoded_from_the_start(tmp_path, monkeypatch):
    """Some containers (a real MPEG-4 AVI with B-frames) give the frames decoded after a seek other
    timestamps than the packet table lists. The frames exist — decoding in sequence finds them — so a
    seek that misses them must fall back to decoding forward, not report the file as corrupt."""
    import contextlib

    import evl.data.video_pyav as V

    path = write_raw(tmp_path / "v.avi", [index_frame(i) for i in range(40)], "mpeg4")
    wanted = [2, 17, 30, 37]   # none a keyframe (every 4th frame is)
    expected = decoded_indices(load_clip(path, indices=wanted, seek="sequential"))
    assert expected == wanted

    real_open, real_frames = V._pyav_open, V._frames
    seeked: set[int] = set()

    class Recording:
        """The container, remembering that it was seeked."""

        def __init__(self, container):
            self._c = container

        def seek(self, *a, **k):
            seeked.add(id(self))
            return self._c.seek(*a, **k)

        def __getattr__(self, name):
            return getattr(self._c, name)

    @contextlib.contextmanager
    def opening(p):
        with real_open(p) as (container, stream):
            yield Recording(container), stream

    def frames_shifted_after_seek(container, stream):
        for frame in real_frames(container._c, stream):
            if id(container) in seeked and frame.pts is not None and not frame.key_frame:
                frame.pts += 10_000    # the seek lands on its keyframe; the frames after it carry other pts
            yield frame

    monkeypatch.setattr(V, "_pyav_open", opening)
    monkeypatch.setattr(V, "_frames", frames_shifted_after_seek)
    for mode in ("auto", "seek"):
        seeked.clear()
        clip = load_clip(path, indices=wanted, seek=mode)
        assert seeked, "the test must exercise a seek"
        assert decoded_indices(clip) == expected
