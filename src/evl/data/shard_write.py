"""`evl shard`: an annotation file and its videos as WebDataset tar shards, with an index.

Each record becomes one sample: `<key>.json` (the record: captions or question/answer/options, time window,
metadata, and for pre-decoded shards the frame mask) and either `<key>.<ext>` — the original video bytes —
or, with `frames`/`size`, `<key>.npy`: the clip decoded once, uint8 (T, C, S, S), T frames sampled uniformly
over the record's window, the short side resized to S and centre-cropped. Shards are written with the
`webdataset` package (any WebDataset reader can read them); `index.json` lists the shards with their sample
counts, and `<shard>.idx.json` beside each shard the byte offset and size of every member, so training can
read a sample without scanning the tar. Videos that cannot be decoded are left out and listed in the index
(`skipped`), with the reason.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from evl.errors import ConfigError, VideoDecodeError

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SHARD_NAME = "{:06d}.tar"
FORMAT_VERSION = 1


def shard_index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".idx.json")


def _record_dict(record) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if v not in (None, [], {})}


def member_offsets(shard: Path) -> list[dict[str, Any]]:
    """[{key, members: {ext: [data offset, size]}}] of a tar shard, in the tar's order (WebDataset's rule: a
    member's key is its name up to the first dot, the rest is its extension)."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(shard, "r") as tar:
        for info in tar:
            if not info.isfile() or "." not in Path(info.name).name:
                continue
            stem, ext = info.name.split(".", 1)
            if not samples or samples[-1]["key"] != stem:
                samples.append({"key": stem, "members": {}})
            samples[-1]["members"][ext] = [info.offset_data, info.size]
    return samples


def _frames_bytes(path: Path, record, frames: int, size: int) -> tuple[bytes, list[bool]]:
    """The record's clip decoded once: `frames` uniform frames, short side resized to `size`, centre-cropped
    (the evaluation transform's geometry, before normalisation), as .npy bytes of uint8 (T, C, S, S)."""
    import numpy as np

    from evl.data.transforms import center_crop, resize_short_side
    from evl.data.video import load_clip

    clip = load_clip(path, frames, "uniform", start=record.start, end=record.end)
    x = center_crop(resize_short_side(clip.frames, size), size)
    buf = io.BytesIO()
    np.save(buf, x.contiguous().numpy(), allow_pickle=False)
    return buf.getvalue(), clip.frame_mask.tolist()


def write_index(out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """`<shard>.idx.json` beside every shard in `out` and `out/index.json` (the shards, their sample counts and
    the total, with `info`: mode, frames, size, source, skipped videos); returns the index."""
    listing = []
    for shard in sorted(Path(out).glob("*.tar")):
        samples = member_offsets(shard)
        shard_index_path(shard).write_text(json.dumps({"samples": samples}))
        listing.append({"name": shard.name, "samples": len(samples)})
    index = {"version": FORMAT_VERSION, **info, "total": sum(s["samples"] for s in listing), "shards": listing}
    (Path(out) / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def write_shards(annotation: str | Path, videos: str | Path | None, out: str | Path, samples_per_shard: int = 1000,
                 frames: int | None = None, size: int | None = None, fmt: str | None = None,
                 split: str | None = None, progress=None) -> dict[str, Any]:
    """Write the shards and the index; returns the index (shards, counts, skipped videos)."""
    from evl.data import MAX_FRAMES, MAX_SYNTH_SIZE
    from evl.data.annotations import read_annotations
    from evl.data.check import guess_videos_dir
    from evl.data.video import verify_video

    try:
        import webdataset as wds
    except ImportError:
        raise ConfigError("evl shard writes with the webdataset package: pip install webdataset") from None
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard {samples_per_shard}: must be >= 1")
    if (frames is None) != (size is None):
        raise ConfigError("--frames and --size go together: both (pre-decoded uint8 frames) or neither (video bytes)")
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        raise ConfigError(f"--frames {frames}: must be between 1 and {MAX_FRAMES}")
    if size is not None and not 8 <= size <= MAX_SYNTH_SIZE:
        raise ConfigError(f"--size {size}: must be between 8 and {MAX_SYNTH_SIZE} pixels")
    out = Path(out)
    if out.exists() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds shards; write into an empty folder (or delete them first)")
    records = read_annotations(annotation, fmt, split=split)
    videos_dir = Path(videos) if videos is not None else guess_videos_dir(annotation, records)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    checked: dict[str, str | None] = {}   # a video named by several records is checked once
    written = 0
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for i, record in enumerate(records):
            path = Path(record.video).expanduser()
            path = path if path.is_absolute() else videos_dir / path
            try:
                if frames is None:
                    if record.video not in checked:
                        checked[record.video] = None
                        verify_video(path)
                    elif checked[record.video] is not None:
                        raise VideoDecodeError(path, checked[record.video])
                    sample = {path.suffix.lstrip(".").lower() or "mp4": path.read_bytes()}
                    meta = _record_dict(record)
                else:
                    data, mask = _frames_bytes(path, record, frames, size)
                    sample = {"npy": data}
                    meta = {**_record_dict(record), "frame_mask": mask}
            except (VideoDecodeError, OSError) as e:
                skipped[record.video] = checked[record.video] = getattr(e, "reason", None) or str(e)
                continue
            sink.write({"__key__": f"{i:09d}", "json": json.dumps(meta, ensure_ascii=False).encode(), **sample})
            written += 1
            if progress is not None:
                progress(i + 1, len(records), record.video)
    shards = sorted(out.glob("*.tar"))
    if not shards:
        raise ConfigError(f"none of the {len(records)} records of {annotation} has a decodable video under "
                          f"{videos_dir}; run `evl data check {annotation}`")
    index = write_index(out, {"mode": "video" if frames is None else "frames", "frames": frames, "size": size,
                              "source": str(annotation), "skipped": skipped})
    if skipped:
        log.warning("%d of %d records left out: their video could not be decoded (listed in %s)",
                    len(records) - written, len(records), out / INDEX_FILE)
    return index
