"""`evl index VIDEO_DIR --model CKPT`: a searchable index of a folder of videos.

Layout of an index folder:

    meta.sqlite    what was indexed: `info` (model checkpoint, its fingerprint, embedding width,
                   tokenizer, root folder, segment length), `videos` (relative path, size, mtime,
                   content fingerprint, duration, fps, or why it could not be read) and `items`
                   (one per video or per segment: start/end seconds, a PNG thumbnail, the embedding)
    index.faiss    the vector index over `items.id`, rebuilt from the stored embeddings at the end
                   of every run: exact inner product up to `approx_above` items, IVF above it

Each video's items are committed in one transaction as soon as they are encoded, so an interrupted run
loses at most the batch in flight and a re-run resumes where it stopped. A re-run encodes only files
that are new or whose size, mtime or content fingerprint changed, and drops the items of deleted ones.

What survives a kill at any moment: `meta.sqlite` is the truth (SQLite transactions), and index.faiss
is a cache of it tagged with the `generation` it was built from (a counter every change to `items`
advances, by trigger, in the same transaction). An opened index whose faiss file is behind, missing or
unreadable rebuilds its vectors from the stored embeddings, so search never pairs a vector with another
item's row; item ids are never reused (`next_item_id`), so a server still holding older vectors finds
either the same item or none. A damaged `meta.sqlite` is reported as such: `evl index --rebuild`.
The embeddings come from the core's `embed_clips` (the retrieval gallery builder), so search ranks a
folder exactly as `evl eval --task retrieval` ranks a test set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evl.errors import ConfigError
from evl.search.vectors import DB_FILE, INDEX_FILE, read_recall_queries, write_vector_index

log = logging.getLogger(__name__)


VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS videos (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL,
    fingerprint TEXT NOT NULL, duration REAL, fps REAL, error TEXT);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, video_id INTEGER NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    start REAL, end REAL, thumbnail BLOB, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS items_video ON items(video_id);
INSERT OR IGNORE INTO info VALUES ('generation', '0');
CREATE TRIGGER IF NOT EXISTS items_added AFTER INSERT ON items
    BEGIN UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'; END;
CREATE TRIGGER IF NOT EXISTS items_removed AFTER DELETE ON items
    BEGIN UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'; END;
CREATE TRIGGER IF NOT EXISTS items_changed AFTER UPDATE ON items
    BEGIN UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'; END;
"""
MIN_SEGMENT_S = 0.5              # --segment below it: most videos would become thousands of items
MAX_SEGMENTS_PER_VIDEO = 10_000  # a video that --segment would cut into more is listed as not indexed
MAX_BATCH_SIZE = 256             # clips per forward pass (each holds num_frames decoded frames)


class IndexDamaged(ConfigError):
    """meta.sqlite cannot be read: the index must be rebuilt."""

    def __init__(self, index_dir: Path, err: Exception):
        super().__init__(f"the index {index_dir} is damaged ({DB_FILE}: {err}); rebuild it with `evl index VIDEO_DIR "
                         f"--model CHECKPOINT --out {index_dir} --rebuild` (every video is encoded again)")


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)   # path → why it could not be indexed
    skipped: dict[str, str] = field(default_factory=dict)  # path → why it was not even looked at (name, link)
    items: int = 0
    kind: str = "exact"
    recall_at_10: float | None = None                       # approximate index against exact search, text queries
    recall_queries: int = 0                                 # how many text queries measured it
    seconds: float = 0.0


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha1 of the size, the first and the last MiB: changes with any re-encode, cheap on big files."""
    h = hashlib.sha1()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def printable(path: str | Path) -> str:
    """A path as text that can always be printed and stored: undecodable bytes as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_videos(root: Path, skipped: dict[str, str] | None = None) -> list[Path]:
    """Video files under `root` (recursively, by extension), sorted. Files that cannot be indexed by name
    are left out, each with its reason in `skipped`: links that leave `root`, dangling links, link loops,
    names that are not UTF-8 (the index stores names as text)."""
    real_root = root.resolve()
    found, skipped = [], skipped if skipped is not None else {}
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(dirpath) / name
            if p.suffix.lower() not in VIDEO_SUFFIXES:
                continue
            rel = printable(p.relative_to(root))
            try:
                str(p.relative_to(root)).encode("utf-8")
                target = p.resolve(strict=True)
            except UnicodeEncodeError:
                skipped[rel] = "the file name is not valid UTF-8; rename it to index it"
                continue
            except FileNotFoundError:
                skipped[rel] = "a link to a file that does not exist"
                continue
            except (OSError, RuntimeError) as e:   # a link loop (RuntimeError before Python 3.13)
                skipped[rel] = f"cannot follow the link: {e}"
                continue
            if not target.is_relative_to(real_root):
                skipped[rel] = f"it links outside {printable(root)}"
                continue
            if not target.is_file():
                skipped[rel] = "not a regular file"
                continue
            found.append(p)
    for rel, why in skipped.items():
        log.warning("skipping %s: %s", rel, why)
    return sorted(found)


def segment_count(duration: float, length: float | None) -> int:
    """How many windows `segments` returns, computed without building them."""
    if length is None or duration <= length:
        return 1
    stride = length / 2
    n = int(np.floor((duration - length) / stride + 1e-9)) + 1
    return n + (1 if (n - 1) * stride + length < duration - 1e-6 else 0)


def segments(duration: float, length: float | None) -> list[tuple[float | None, float | None]]:
    """Windows of `length` seconds every length/2 seconds (overlapping by half) covering the video;
    one window (None, None) = the whole video when `length` is None or the video is not longer."""
    if length is None or duration <= length:
        return [(None, None)]
    stride = length / 2
    starts = list(np.arange(0.0, max(duration - length, 0.0) + 1e-9, stride))
    if starts[-1] + length < duration - 1e-6:
        starts.append(duration - length)
    return [(round(float(s), 3), round(float(min(s + length, duration)), 3)) for s in starts]


def png_bytes(rgb: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 image as PNG (no imaging library needed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def connect(index_dir: Path, read_only: bool = False) -> sqlite3.Connection:
    """Open an index's meta.sqlite (created when writing), checked page by page: a damaged file raises
    IndexDamaged. `read_only` (search, serve) never creates or changes the schema and may be shared between
    threads (the server's, under its lock); it still opens the file for writing where it may, because the
    first reader after a killed `evl index` must roll back the journal that run left behind."""
    path = Path(index_dir) / DB_FILE
    try:
        if read_only:
            may_write = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode={'rw' if may_write else 'ro'}", uri=True,
                                 check_same_thread=False)
        else:
            db = sqlite3.connect(path)
        status = db.execute("PRAGMA quick_check").fetchone()[0]
        if status != "ok":
            raise sqlite3.DatabaseError(status)
        if not read_only:
            db.execute("PRAGMA foreign_keys = ON")
            db.executescript(SCHEMA)
        read_info(db)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            raise IndexDamaged(Path(index_dir), e) from e
        if "readonly" in str(e):
            raise ConfigError(f"{path}: an interrupted `evl index` left its journal ({DB_FILE}-journal), and "
                              "rolling it back needs write access to the folder; run `evl index` again, or search "
                              "as a user who may write there") from e
        raise ConfigError(f"cannot open {path}: {e}; check that the folder exists and you may read "
                          f"{'' if read_only else 'and write '}it") from e
    except sqlite3.DatabaseError as e:
        raise IndexDamaged(Path(index_dir), e) from e
    return db


def read_info(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT key, value FROM info").fetchall())


def _check_same_model(info: dict[str, str], fingerprint: str, width: int, checkpoint: Path, index_dir: Path) -> None:
    if "model_fingerprint" in info and info["model_fingerprint"] != fingerprint:
        raise ConfigError(
            f"{index_dir} was built with the model {info.get('model')} (fingerprint {info.get('model_fingerprint')}, "
            f"embedding width {info.get('embed_dim')}); {checkpoint} is another model (fingerprint {fingerprint}, "
            f"width {width}). Index into a new folder (--out), or delete {index_dir} to rebuild it")


def check_index_options(segment: float | None, batch_size: int, approx_above: int) -> None:
    """Refuse out-of-range values before anything is read or written."""
    if segment is not None and not (math.isfinite(segment) and segment >= MIN_SEGMENT_S):
        raise ConfigError(f"--segment {segment}: must be a number of seconds >= {MIN_SEGMENT_S} (segments overlap "
                          f"by half; a video is cut into at most {MAX_SEGMENTS_PER_VIDEO} of them)")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"--batch-size {batch_size}: must be between 1 and {MAX_BATCH_SIZE} clips per forward pass")
    if approx_above < 0:
        raise ConfigError(f"--approx-above {approx_above}: must be >= 0 (items above it get an approximate index)")


def prepare_out(out: Path) -> None:
    """Create the index folder (or check it) and check that it is writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {printable(out)}: is a file, not a folder; name a folder for the index")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".evl-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {printable(out)}: cannot write there ({e.strerror or e}); choose a folder you can "
                          "write to") from e


@contextlib.contextmanager
def writer_lock(out: Path):
    """One `evl index` at a time per index folder (an advisory lock the OS drops when the process dies)."""
    import fcntl

    with (out / ".evl-index.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConfigError(f"another `evl index` is writing {printable(out)}; wait for it to finish") from e
        yield


def _take_item_ids(db: sqlite3.Connection, n: int) -> list[int]:
    """n new item ids, never used before in this index (also by deleted items), in the caller's transaction."""
    recorded = db.execute("SELECT value FROM info WHERE key = 'next_item_id'").fetchone()
    start = max(int(recorded[0]) if recorded else 1, db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM items").fetchone()[0])
    db.execute("INSERT OR REPLACE INTO info VALUES ('next_item_id', ?)", (str(start + n),))
    return list(range(start, start + n))


def build_index(root: Path, checkpoint: Path, out: Path, segment: float | None = None, batch_size: int = 16,
                approx_above: int = 100_000, thumb_size: int = 96,
                progress: Callable[[int, int, str], None] | None = None,
                recall_queries: Path | None = None, rebuild: bool = False, backend: str | None = None) -> IndexReport:
    """Index (or update the index of) the videos under `root` with the dual encoder of `checkpoint` (or
    of an `evl export` folder, `backend` "onnx" / "onnx-int8"). An approximate index's recall@10 is
    measured with text queries (what search is asked): the lines of `recall_queries`, or the packaged
    generic ones. `rebuild` starts the index afresh (a damaged one)."""
    from evl.api import load

    t0 = time.perf_counter()
    root, checkpoint, out = Path(root), Path(checkpoint), Path(out)
    if not root.is_dir():
        raise ConfigError(f"{printable(root)} is not a folder; pass the folder that holds your videos")
    check_index_options(segment, batch_size, approx_above)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"--model {printable(checkpoint)}: not an evl checkpoint folder (no config.json)")
    queries = read_recall_queries(recall_queries)
    model = load(checkpoint, backend)
    if not model.can("encode_video"):
        raise ConfigError(f"--model {printable(checkpoint)} is a {model.kind!r} model without a dual encoder; index with "
                          "a retrieval checkpoint (evl pretrain / evl finetune) or its `evl export` folder")
    fingerprint = model.weights_fingerprint
    prepare_out(out)
    with writer_lock(out):
        if rebuild:   # only the index's own files: the folder may hold anything else
            for name in (DB_FILE, DB_FILE + "-journal", INDEX_FILE, INDEX_FILE + ".tmp"):
                (out / name).unlink(missing_ok=True)
        db = connect(out)
        try:
            return _update(db, root, checkpoint, out, model, fingerprint, segment, batch_size, approx_above,
                           thumb_size, progress, queries, t0)
        finally:
            db.close()


def _update(db, root, checkpoint, out, model, fingerprint, segment, batch_size, approx_above, thumb_size,
            progress, queries, t0) -> IndexReport:
    from evl.data.text import tokenizer_name
    from evl.data.video import load_clip, probe_video
    from evl.errors import VideoDecodeError

    info = read_info(db)
    _check_same_model(info, fingerprint, model.embed_dim, checkpoint, out)
    if info.get("num_frames", str(model.num_frames)) != str(model.num_frames):   # e.g. an `evl export --frames` copy
        raise ConfigError(f"{printable(out)} was built reading {info['num_frames']} frames per clip; {printable(checkpoint)} "
                          f"reads {model.num_frames}: their vectors do not mix. Use the same model, or index into a new folder")
    if "model_fingerprint" in info and info.get("segment") != str(segment):
        raise ConfigError(f"{printable(out)} was built with --segment {info.get('segment')}; this run asks for {segment}. "
                          "Use the same value, or index into a new folder")
    tokenizer = model.tokenizer
    db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [
        ("model", str(checkpoint.resolve())), ("model_fingerprint", fingerprint), ("backend", model.backend),
        ("num_frames", str(model.num_frames)),
        ("embed_dim", str(model.embed_dim)), ("tokenizer", tokenizer_name(tokenizer)),
        ("tokenizer_fingerprint", tokenizer.fingerprint), ("root", str(root.resolve())), ("segment", str(segment)),
        ("approx_above", str(approx_above))])
    db.commit()
    report = IndexReport()
    files = {str(p.relative_to(root)): p for p in find_videos(root, report.skipped)}
    known = {row[0]: row[1:] for row in db.execute("SELECT path, size, mtime, fingerprint, id, error FROM videos")}
    for rel in sorted(set(known) - set(files)):
        db.execute("DELETE FROM videos WHERE path = ?", (rel,))
        report.removed.append(rel)
    db.commit()
    todo = []
    for rel, path in files.items():
        st = path.stat()
        old = known.get(rel)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime:
            report.unchanged += 1
            continue
        fp = file_fingerprint(path)
        if old is not None and old[2] == fp:   # touched but not changed: keep its items
            db.execute("UPDATE videos SET size = ?, mtime = ? WHERE path = ?", (st.st_size, st.st_mtime, rel))
            report.unchanged += 1
            continue
        todo.append((rel, path, st, fp, old is not None))
    db.commit()
    for n, (rel, path, st, fp, existed) in enumerate(todo):
        if progress is not None:
            progress(n, len(todo), rel)
        db.execute("DELETE FROM videos WHERE path = ?", (rel,))
        windows: list[tuple[float | None, float | None]] = []
        try:
            meta = probe_video(path)
            count = segment_count(meta.duration, segment) if math.isfinite(meta.duration) else None
            if count is None or count > MAX_SEGMENTS_PER_VIDEO:
                raise VideoDecodeError(path, f"--segment {segment} would cut this {meta.duration} s video into "
                                       f"{count or 'unboundedly many'} segments (at most {MAX_SEGMENTS_PER_VIDEO}); "
                                       "index it with a longer --segment")
            windows = segments(meta.duration, segment)
            emb = model.encode_video([(path, s, e) for s, e in windows], batch_size=batch_size).numpy()
            thumbs = [png_bytes(_thumbnail(load_clip(path, 1, "uniform", start=s, end=e).frames[0], thumb_size))
                      for s, e in windows]
        except (VideoDecodeError, OSError) as e:   # one bad file never ends the run
            reason = _failure_reason(e)
            db.execute("INSERT INTO videos (path, size, mtime, fingerprint, error) VALUES (?, ?, ?, ?, ?)",
                       (rel, st.st_size, st.st_mtime, fp, reason))
            db.commit()
            report.failed[rel] = reason
            continue
        cur = db.execute("INSERT INTO videos (path, size, mtime, fingerprint, duration, fps) VALUES (?, ?, ?, ?, ?, ?)",
                         (rel, st.st_size, st.st_mtime, fp, meta.duration, meta.fps))
        ids = _take_item_ids(db, len(windows))
        db.executemany("INSERT INTO items (id, video_id, start, end, thumbnail, embedding) VALUES (?, ?, ?, ?, ?, ?)",
                       [(ids[i], cur.lastrowid, s, e, t, emb[i].tobytes())
                        for i, ((s, e), t) in enumerate(zip(windows, thumbs, strict=True))])
        db.commit()   # this video is done: an interrupted run does not encode it again
        (report.updated if existed else report.added).append(rel)
    report.failed.update({p: e for p, e in db.execute("SELECT path, error FROM videos WHERE error IS NOT NULL")
                          if p not in report.failed})

    def embed_queries() -> np.ndarray:
        return model.encode_text(queries).numpy()

    report.items, report.kind, report.recall_at_10 = write_vector_index(db, out, model.embed_dim, approx_above,
                                                                        embed_queries)
    report.recall_queries = len(queries) if report.recall_at_10 is not None else 0
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _failure_reason(err: Exception) -> str:
    """Why a file could not be indexed, in words: the decoder's reason (the first window that failed)."""
    from evl.errors import VideoDecodeError

    if isinstance(err, VideoDecodeError):
        return err.reason
    if isinstance(err, OSError):
        return f"cannot read the file: {err}"
    return str(err)


def _thumbnail(frame, size: int) -> np.ndarray:
    """(C, H, W) uint8 → (h, w, 3) with the long side `size`."""
    import torch.nn.functional as F

    c, h, w = frame.shape
    scale = size / max(h, w)
    out = F.interpolate(frame[None].float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                        mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


def iter_failed(report: IndexReport) -> Iterable[str]:
    return (f"{p}: {why}" for p, why in sorted(report.failed.items()))


__all__ = ["IndexReport", "build_index", "find_videos", "segments", "png_bytes"]
