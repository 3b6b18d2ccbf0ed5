"""`evl data check`: parse an annotation file and check that every referenced video exists and decodes.

Why: a missing or corrupt video usually surfaces as a crash deep inside a DataLoader worker, hours into
a run. Checking up front, and counting problems instead of stopping at the first, lets a user fix the
whole dataset in one pass. Only an annotation file that cannot be parsed raises; video problems are
counted and a few examples with reasons are kept.

Where videos are looked for (when `videos_dir` is not given): the candidates are, in order,
  1. the annotation file's folder,
  2. its `videos/` subfolder,
  3. its parent's `videos/` folder (the SynthVL layout: OUT/annotations/*.json + OUT/videos/*.mp4),
  4. its parent folder (for annotations that name videos as "videos/x.mp4" relative to OUT/).
The candidate holding the most of (a sample of) the referenced videos wins; ties go to the earlier one;
if none holds any, the annotation file's folder is used and every video is reported missing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from evl.data.annotations import Record, read_annotations_with_format, split_sizes
from evl.errors import ConfigError

EXAMPLES = 5  # how many missing / undecodable paths a summary keeps, with reasons
_SAMPLE = 64  # how many distinct videos are probed when guessing the videos folder


def resolve_video_path(record: Record, videos_dir: str | Path | None) -> Path:
    """The file a record names: absolute paths are kept, relative ones are joined to `videos_dir`."""
    video = Path(record.video).expanduser()
    if video.is_absolute() or videos_dir is None:
        return video
    return Path(videos_dir) / video


def candidate_video_dirs(annotation_path: str | Path) -> list[Path]:
    """The folders `guess_videos_dir` tries, in order (see the module docstring for why these)."""
    folder = Path(annotation_path).resolve().parent
    return [folder, folder / "videos", folder.parent / "videos", folder.parent]


def guess_videos_dir(annotation_path: str | Path, records: list[Record]) -> Path:
    """Pick the candidate folder where the most of the first distinct referenced videos exist."""
    sample = list(dict.fromkeys(r.video for r in records))[:_SAMPLE]
    best, best_hits = None, 0
    for folder in candidate_video_dirs(annotation_path):
        if not folder.is_dir():
            continue
        hits = sum(resolve_video_path(Record(video=v), folder).is_file() for v in sample)
        if hits > best_hits:
            best, best_hits = folder, hits
    return best if best is not None else Path(annotation_path).resolve().parent


def _verify(path: Path) -> None:
    """Open and decode `path` with evl's video backend; raises VideoDecodeError on failure."""
    from evl.data.video import verify_video  # lazy: loads FFmpeg only when decoding is asked for

    verify_video(path)


def _video_problem(path: Path, decode: bool) -> tuple[str, str] | None:
    """("missing" | "undecodable", reason) for a bad video, None for a good one."""
    if not path.exists():
        return "missing", "file not found"
    if not path.is_file():
        return "missing", "not a regular file (a folder?)"
    if path.stat().st_size == 0:
        return "undecodable", "file is empty (0 bytes)"
    if not decode:
        return None
    try:
        _verify(path)
    except Exception as e:  # noqa: BLE001 — a checker reports every failure; it must not stop at one
        reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
        return "undecodable", str(reason)
    return None


def preflight_videos(records: list[Record], videos_dir: str | Path | None, what: str,
                     sample: int = 1000) -> float:
    """Before training: do the videos exist? Checks (a fixed sample of) the distinct videos' files,
    no decoding. Raises ConfigError when none is there, naming the folder and a few paths; returns the
    fraction missing (the caller warns when it is high)."""
    videos = list(dict.fromkeys(r.video for r in records))
    if len(videos) > sample:
        videos = videos[:: len(videos) // sample][:sample]
    missing = [p for p in (resolve_video_path(Record(video=v), videos_dir) for v in videos) if not p.is_file()]
    if videos and len(missing) == len(videos):
        raise ConfigError(f"none of the {len(videos)} videos checked for {what} exists under the videos folder "
                          f"{videos_dir} (e.g. {', '.join(str(p) for p in missing[:3])}); set data.videos to "
                          "the folder the annotation's paths are relative to, and run `evl data check` on it")
    return len(missing) / max(len(videos), 1)


def _type_counts(records: list[Record]) -> dict[str, int]:
    """Per question type for QA records (their qtype), per task kind for the rest."""
    counts = Counter(r.qtype if r.qtype and r.kind != "caption" else r.kind for r in records)
    return dict(sorted(counts.items()))


def check_annotations(path: str | Path, videos_dir: str | Path | None = None, fmt: str | None = None,
                      decode: bool = True, split: str | None = None) -> dict[str, Any]:
    """Parse `path`, check each distinct video once, and return a JSON-serialisable summary.

    Keys: annotation, format, videos_dir, records, videos (distinct), ok, missing, undecodable,
    decoded (whether decoding was checked), types, kinds, split (the one selected, or None), splits
    ({name: {"records", "videos"}} of the records checked, for formats that carry splits, else {}),
    missing_examples, undecodable_examples (each example: {"video", "path", "reason"}). With `split`
    only that split is checked and counted. Raises AnnotationError only for an unparseable file or a
    bad split (see `select_split`).
    """
    path = Path(path)
    fmt_name, records = read_annotations_with_format(path, fmt=fmt, split=split)
    folder = Path(videos_dir) if videos_dir is not None else guess_videos_dir(path, records)
    problems: dict[str, list[dict[str, str]]] = {"missing": [], "undecodable": []}
    videos = list(dict.fromkeys(r.video for r in records))
    for video in videos:
        file = resolve_video_path(Record(video=video), folder)
        problem = _video_problem(file, decode)
        if problem is not None:
            problems[problem[0]].append({"video": video, "path": str(file), "reason": problem[1]})
    return {
        "annotation": str(path),
        "format": fmt_name,
        "videos_dir": str(folder),
        "records": len(records),
        "videos": len(videos),
        "ok": len(videos) - len(problems["missing"]) - len(problems["undecodable"]),
        "missing": len(problems["missing"]),
        "undecodable": len(problems["undecodable"]),
        "decoded": decode,
        "types": _type_counts(records),
        "kinds": dict(sorted(Counter(r.kind for r in records).items())),
        "split": split,
        "splits": split_sizes(records, fmt_name),
        "missing_examples": problems["missing"][:EXAMPLES],
        "undecodable_examples": problems["undecodable"][:EXAMPLES],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line table of a `check_annotations` summary, problems listed last."""
    rows = [
        ("annotation", summary["annotation"]),
        ("format", summary["format"]),
        *([("split", summary["split"])] if summary.get("split") else []),
        ("videos dir", summary["videos_dir"]),
        ("records", summary["records"]),
        ("videos", summary["videos"]),
        ("ok" if summary.get("decoded", True) else "ok (exists, not decoded)", summary["ok"]),
        ("missing", summary["missing"]),
        ("undecodable", summary["undecodable"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if summary.get("splits"):
        lines.append("splits")
        sw = max(len(name) for name in summary["splits"])
        lines += [f"  {name:<{sw}}  {n['records']} records, {n['videos']} videos"
                  for name, n in summary["splits"].items()]
    if summary.get("types"):
        lines.append("types")
        tw = max(len(t) for t in summary["types"])
        lines += [f"  {t:<{tw}}  {n}" for t, n in summary["types"].items()]
    for key, title in (("missing_examples", "missing"), ("undecodable_examples", "undecodable")):
        examples = summary.get(key) or []
        if examples:
            shown = f"first {len(examples)} of {summary[title]}"
            lines.append(f"{title} videos ({shown}):")
            lines += [f"  {e['path']}: {e['reason']}" for e in examples]
    return "\n".join(lines)
