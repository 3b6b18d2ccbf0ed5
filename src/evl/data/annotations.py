"""Annotation readers for the standard video-language formats, all producing one `Record` type.

Why one record type: datasets, tasks and `evl data check` should not care whether the labels came from
a LAVIS/VindLU JSON, the official MSRVTT file, a NExT-QA CSV, STAR, WebVid or EgoClip. Every reader
validates as it goes and raises `AnnotationError` naming the file, the row (1-based; for CSV also the
line), the field, the bad value and what was expected — a malformed row found at epoch 3 wastes a run.

Readers are plain functions in the `FORMATS` registry (no registration by import side effect). The
first line of each reader's docstring is what `evl data formats` prints.
"""

from __future__ import annotations

import ast
import csv
import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evl.data.records import (
    Record,
    _answer_index,
    _csv_rows,
    _get,
    _guarded,
    _integer,
    _is_text,
    _load_json,
    _match_answer,
    _meta,
    _nonempty,
    _number,
    _read_text,
    _Row,
    _rows_list,
    _sniff_delimiter,
    _span,
    _text,
    _with_ext,
)
from evl.errors import AnnotationError

# ----------------------------------------------------------------------------- LAVIS / VindLU JSON


def _lavis_record(row: Any, where: _Row) -> Record:
    if not isinstance(row, dict):
        raise where.error("(row)", row, "a JSON object with at least 'video'")
    video = _text(_get(row, "video", where), "video", where)
    rec = Record(video=video, source=where.source)
    answer = row.get("answer")
    caption = row.get("caption")
    multiple_choice = isinstance(answer, int) and not isinstance(answer, bool)
    if caption is not None:
        if isinstance(caption, str):
            caption = [caption]
        if not isinstance(caption, list) or not caption or not all(_is_text(c) for c in caption):
            raise where.error("caption", row["caption"], "a non-blank string or a non-empty list of them")
        if multiple_choice:
            rec.options = list(caption)
        else:
            rec.captions = list(caption)
    if row.get("options") is not None:
        opts = row["options"]
        if not isinstance(opts, list) or not opts or not all(_is_text(o) for o in opts):
            raise where.error("options", opts, "a non-empty list of non-blank strings")
        rec.options = list(opts)
    if row.get("question") is not None:
        rec.question = _text(row["question"], "question", where)
    if answer is not None:
        if multiple_choice:
            if rec.options is None:
                raise where.error("answer", answer, "an answer text (an integer answer needs a 'caption' "
                                  "or 'options' list of candidates)")
            rec.answer_index = _answer_index(rec.options, answer, "answer", where)
            rec.answer = rec.options[rec.answer_index]
        elif _is_text(answer):
            rec.answer = answer
            if rec.options is not None:
                rec.answer_index = _match_answer(rec.options, answer, "answer", where)
        else:
            raise where.error("answer", answer, "a non-blank string (open-ended) or an integer option index")
    qtype_key = "type" if row.get("type") is not None else "qtype"
    if row.get(qtype_key) is not None:
        rec.qtype = _text(row[qtype_key], qtype_key, where).strip()
    rec.start, rec.end = _span(row, "start", "end", where)
    if not rec.captions and rec.question is None and rec.options is None:
        raise where.error("caption", None, "a 'caption' (retrieval), a 'question' (QA) or candidates (multiple choice)")
    rec.meta = _meta(row, {"video", "caption", "options", "question", "answer", "type", "qtype", "start", "end"})
    return rec


def _lavis_records(data: Any, path: Path) -> list[Record]:
    rows = _rows_list(data, path, "annotation")
    return _nonempty([_lavis_record(row, _Row(path, i)) for i, row in enumerate(rows, start=1)], path)


def read_lavis(path: str | Path) -> list[Record]:
    """LAVIS/VindLU JSON list or JSON Lines: {video, caption} | {video, question, answer, type} | {video, caption: [options], answer: int}."""
    path = Path(path)
    return _lavis_records(_load_json(path), path)


# ----------------------------------------------------------------------------- MSRVTT official


def _msrvtt_records(data: Any, path: Path) -> list[Record]:
    if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
        raise AnnotationError(f"{path}: expected the MSRVTT_data.json layout "
                              "{'videos': [...], 'sentences': [...]}")
    videos = _rows_list(data["videos"], path, "'videos'")
    sentences = _rows_list(data["sentences"], path, "'sentences'")
    records: dict[str, Record] = {}
    first_row: dict[str, int] = {}
    for i, row in enumerate(videos, start=1):
        where = _Row(path, i, label="videos row")
        if not isinstance(row, dict):
            raise where.error("videos[]", row, "an object with 'video_id'")
        vid = _text(_get(row, "video_id", where), "video_id", where)
        if vid in first_row:  # a second entry would silently replace the first, split included
            raise where.error("video_id", vid, f"a video_id listed once (already at videos row {first_row[vid]})")
        first_row[vid] = i
        meta = {**_meta(row, {"video_id", "split"}), "video_id": vid, "sen_ids": []}
        if row.get("split") is not None:
            meta["split"] = _text(row["split"], "split", where)
        records[vid] = Record(video=_with_ext(vid), source=f"{path}:videos[{i}]", meta=meta)
    for i, row in enumerate(sentences, start=1):
        where = _Row(path, i, label="sentences row")
        if not isinstance(row, dict):
            raise where.error("sentences[]", row, "an object with 'video_id' and 'caption'")
        vid = row.get("video_id")
        if not isinstance(vid, str) or vid not in records:
            raise where.error("video_id", vid, "a video_id listed under 'videos'")
        caption = _text(row.get("caption"), "caption", where)
        records[vid].captions.append(caption)
        if "sen_id" in row:
            records[vid].meta["sen_ids"].append(row["sen_id"])
    return _nonempty(list(records.values()), path)


def read_msrvtt(path: str | Path) -> list[Record]:
    """MSRVTT official MSRVTT_data.json: {videos: [{video_id, split}], sentences: [{video_id, caption}]} → one record per video."""
    path = Path(path)
    return _msrvtt_records(_load_json(path), path)


# ----------------------------------------------------------------------------- STAR JSON


def _star_choices(value: Any, where: _Row) -> list[str]:
    if not isinstance(value, list) or not value:
        raise where.error("choices", value, "a non-empty list of {'choice_id', 'choice'} objects or strings")
    out = []
    for c in value:
        text = c.get("choice") if isinstance(c, dict) else c
        if not _is_text(text):
            raise where.error("choices", c, "{'choice_id': int, 'choice': str} or a string")
        out.append(text)
    return out


def _star_record(row: Any, where: _Row) -> Record:
    if not isinstance(row, dict):
        raise where.error("(row)", row, "a JSON object with question_id, question, video_id, choices")
    qid = _text(_get(row, "question_id", where), "question_id", where)
    vid = _text(_get(row, "video_id", where), "video_id", where)
    options = _star_choices(_get(row, "choices", where), where)
    rec = Record(video=_with_ext(vid), question=_text(_get(row, "question", where), "question", where),
                 options=options, qtype=qid.split("_")[0], source=where.source)
    answer = row.get("answer")
    if answer is not None:  # the STAR test split has no answers
        rec.answer = _text(answer, "answer", where)
        rec.answer_index = _match_answer(options, rec.answer, "answer", where)
    rec.start, rec.end = _span(row, "start", "end", where)
    rec.meta = _meta(row, {"video_id", "question", "answer", "choices", "start", "end"})
    return rec


def _star_records(data: Any, path: Path) -> list[Record]:
    rows = _rows_list(data, path, "STAR question")
    return _nonempty([_star_record(row, _Row(path, i)) for i, row in enumerate(rows, start=1)], path)


def read_star(path: str | Path) -> list[Record]:
    """STAR JSON: {question_id, question, video_id, start, end, answer, choices}; qtype from the question_id prefix."""
    path = Path(path)
    return _star_records(_load_json(path), path)


# ----------------------------------------------------------------------------- CSV formats

_NEXTQA_COLUMNS = ("video", "question", "answer", "a0")


def _option_columns(row: dict) -> list[str]:
    """The contiguous option columns a0, a1, ... (NExT-QA has five; other MC CSVs may have more or fewer)."""
    keys = []
    while f"a{len(keys)}" in row:
        keys.append(f"a{len(keys)}")
    return keys


def read_nextqa(path: str | Path) -> list[Record]:
    """NExT-QA CSV: video, frame_count, width, height, question, answer (option index), qid, type, a0..a4."""
    path = Path(path)
    records = []
    for row, where in _csv_rows(path, _NEXTQA_COLUMNS):
        option_keys = _option_columns(row)
        options = [_text(row[k], k, where) for k in option_keys]
        idx = _answer_index(options, _integer(row["answer"], "answer", where), "answer", where)
        rec = Record(video=_with_ext(_text(row["video"], "video", where)),
                     question=_text(row["question"], "question", where), options=options, answer_index=idx,
                     answer=options[idx], qtype=row.get("type") or None, source=where.source)
        meta = _meta(row, {"video", "question", "answer", "type", *option_keys})
        for k in ("frame_count", "width", "height"):
            if meta.get(k, "").strip().isdigit():
                meta[k] = int(meta[k])
        rec.meta = meta
        records.append(rec)
    return _nonempty(records, path)


_WEBVID_COLUMNS = ("videoid", "name", "page_dir")


def read_webvid(path: str | Path) -> list[Record]:
    """WebVid CSV: videoid, name, page_dir, duration, contentUrl → video = page_dir/videoid.mp4, caption = name."""
    path = Path(path)
    records = []
    for row, where in _csv_rows(path, _WEBVID_COLUMNS):
        vid = _text(row["videoid"], "videoid", where).strip()
        page = _text(row["page_dir"], "page_dir", where).strip()
        rec = Record(video=f"{page}/{_with_ext(vid)}", captions=[_text(row["name"], "name", where)],
                     source=where.source, meta=_meta(row, {"name"}))
        if rec.meta.get("duration"):
            rec.meta["duration"] = _webvid_duration(rec.meta["duration"], where)
        records.append(rec)
    return _nonempty(records, path)


def _webvid_duration(value: str, where: _Row) -> float:
    """WebVid durations are ISO-8601 like 'PT00H00M11S'; plain seconds are accepted too."""
    v = value.strip()
    if v.upper().startswith("PT"):
        import re

        m = re.fullmatch(r"PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", v.upper())
        if not m:
            raise where.error("duration", value, "seconds or an ISO-8601 duration like 'PT00H00M11S'")
        h, mi, s = (float(x) if x else 0.0 for x in m.groups())
        return h * 3600 + mi * 60 + s
    return _number(v, "duration", where)


_EGOCLIP_COLUMNS = ("video_uid", "clip_start", "clip_end", "clip_text")


def _tag_list(value: str | None, key: str, where: _Row) -> list[int]:
    """Parse a stringified int list like "[3, 12]" safely (json, then ast.literal_eval — never eval)."""
    if value is None or not value.strip():
        return []
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise where.error(key, value, 'a list of integers like "[3, 12]"') from None
    if isinstance(parsed, tuple):
        parsed = list(parsed)
    if not isinstance(parsed, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in parsed):
        raise where.error(key, value, 'a list of integers like "[3, 12]"')
    return parsed


def read_egoclip(path: str | Path) -> list[Record]:
    """EgoClip CSV/TSV: video_uid, clip_start, clip_end, clip_text, tag_verb, tag_noun (clip-level narrations)."""
    path = Path(path)
    records = []
    for row, where in _csv_rows(path, _EGOCLIP_COLUMNS):
        start, end = _span(row, "clip_start", "clip_end", where)
        if start is None or end is None:
            raise where.error("clip_start" if start is None else "clip_end", "", "a number (seconds)")
        rec = Record(video=_with_ext(_text(row["video_uid"], "video_uid", where).strip()),
                     captions=[_text(row["clip_text"], "clip_text", where)], start=start, end=end,
                     source=where.source)
        meta = _meta(row, {"clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"})
        meta["verbs"] = _tag_list(row.get("tag_verb"), "tag_verb", where)
        meta["nouns"] = _tag_list(row.get("tag_noun"), "tag_noun", where)
        rec.meta = meta
        records.append(rec)
    return _nonempty(records, path)


# ----------------------------------------------------------------------------- registry + detection

FORMATS: dict[str, Callable[[str | Path], list[Record]]] = {
    "lavis": read_lavis,
    "msrvtt": read_msrvtt,
    "nextqa": read_nextqa,
    "star": read_star,
    "webvid": read_webvid,
    "egoclip": read_egoclip,
}

_JSON_BUILDERS: dict[str, Callable[[Any, Path], list[Record]]] = {
    "lavis": _lavis_records,
    "msrvtt": _msrvtt_records,
    "star": _star_records,
}

_CSV_HEADERS = (("egoclip", _EGOCLIP_COLUMNS), ("webvid", _WEBVID_COLUMNS), ("nextqa", _NEXTQA_COLUMNS))


def _detect_json(data: Any, path: Path) -> str:
    if isinstance(data, dict) and "videos" in data and "sentences" in data:
        return "msrvtt"
    if isinstance(data, list):
        first = next((r for r in data if isinstance(r, dict)), None)
        if first is None:
            raise AnnotationError(f"{path}: no records; the JSON list holds no annotation objects")
        if "question_id" in first and "choices" in first:
            return "star"
        if "video" in first:
            return "lavis"
        raise AnnotationError(f"{path}: cannot tell the format from the keys {sorted(first)}; expected 'video' "
                              "(lavis) or 'question_id'+'choices' (star); pass the format explicitly")
    keys = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise AnnotationError(f"{path}: cannot tell the format of a JSON {keys}; expected a list of objects "
                          "(lavis/star) or {'videos', 'sentences'} (msrvtt)")


def _detect_csv(path: Path) -> str:
    header_line = _read_text(path).splitlines()[0]
    reader = csv.reader([header_line], delimiter=_sniff_delimiter(header_line))
    header = {c.strip() for row in _guarded(reader, path) for c in row}
    for name, required in _CSV_HEADERS:
        if set(required) <= header:
            return name
    expected = "; ".join(f"{n}: {list(c)}" for n, c in _CSV_HEADERS)
    raise AnnotationError(f"{path}: cannot tell the format from the header {sorted(header)}; "
                          f"expected the columns of one of — {expected}")


def _is_tabular(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv")


def detect_format(path: str | Path) -> str:
    """Name the format of an annotation file from its extension and its header (CSV) or keys (JSON)."""
    path = Path(path)
    if _is_tabular(path):
        return _detect_csv(path)
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        return _detect_json(_load_json(path), path)
    raise AnnotationError(f"{path}: unknown annotation file extension {path.suffix!r}; "
                          "expected .json, .jsonl, .csv or .tsv (or pass the format explicitly)")


# Formats whose files carry each record's split, and where; `read_annotations(..., split=...)` selects on
# it (stored as `record.meta["split"]`). The other formats ship one file per split (NExT-QA train/val/test
# CSVs, STAR_train/val.json, WebVid's results_*_train/val.csv, LAVIS/VindLU per-split JSONs).
SPLIT_FIELDS: dict[str, str] = {"msrvtt": "the 'split' of each entry in 'videos'"}

NO_SPLIT = "(none)"  # `split_sizes` key for records without a split in a file where others have one


def split_sizes(records: list[Record], fmt: str) -> dict[str, dict[str, int]]:
    """{split: {"records": n, "videos": distinct videos}} in file order, for formats that carry splits;
    {} for the others (a stray 'split' key in their rows' meta is not a split)."""
    if fmt not in SPLIT_FIELDS or not any("split" in r.meta for r in records):
        return {}
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(str(r.meta.get("split", NO_SPLIT)), []).append(r)
    return {name: {"records": len(rs), "videos": len({r.video for r in rs})} for name, rs in groups.items()}


def _nearest_split(name: str, names: list[str]) -> str | None:
    """The split a user most likely meant: same name in another case, a prefix ('val' → 'validate',
    'training' → 'train'), else the closest spelling."""
    folded = name.strip().lower()
    for n in names:
        if n.lower() == folded:
            return n
    if len(folded) >= 3:
        for n in names:
            if n.lower().startswith(folded) or folded.startswith(n.lower()):
                return n
    close = difflib.get_close_matches(folded, [n.lower() for n in names], n=1, cutoff=0.5)
    return next((n for n in names if close and n.lower() == close[0]), None)


def select_split(records: list[Record], split: str, path: str | Path, fmt: str) -> list[Record]:
    """The records of `split`, matched exactly. Errors (each says what to do): a format that carries no
    splits, a file whose entries lack the split field, an unknown name (listing the file's splits with
    their sizes and the nearest name), a split with no annotated records. Training on the wrong split is
    worse than not training, so nothing here guesses."""
    if fmt not in SPLIT_FIELDS:
        stray = any("split" in r.meta for r in records)
        note = (" (its rows' 'split' values are kept in record.meta but are not a split of this format)"
                if stray else "")
        raise AnnotationError(f"{path}: split {split!r} was asked for, but the {fmt} format carries no split{note}; "
                              "drop the split option (--split / data.split), or split the file and pass the "
                              "file of that split (formats with splits: " + ", ".join(SPLIT_FIELDS) + ")")
    sizes = split_sizes(records, fmt)
    if not sizes:
        raise AnnotationError(f"{path}: split {split!r} was asked for, but no entry has a split "
                              f"({SPLIT_FIELDS[fmt]} is absent); drop the split option, or use a file that "
                              "carries splits (the official MSRVTT_data.json does)")
    if NO_SPLIT in sizes:
        bare = next(r for r in records if "split" not in r.meta)
        others = len(records) - sizes[NO_SPLIT]["records"]
        raise AnnotationError(f"{bare.source}: video {bare.video!r} has no 'split' while {others} other entries "
                              "have one; give every video a split to select one, or drop the split option")
    if split not in sizes:
        listed = ", ".join(f"{name} ({n['videos']}{' videos' if i == 0 else ''})"
                           for i, (name, n) in enumerate(sizes.items()))
        near = _nearest_split(split, list(sizes))
        hint = f"; did you mean {near!r}?" if near else f"; use one of {', '.join(sizes)}"
        raise AnnotationError(f"{path} has splits {listed}; got {split!r}{hint} (split names are matched exactly)")
    selected = [r for r in records if r.meta.get("split") == split]
    annotated = [r for r in selected if r.captions or r.question is not None or r.options]
    if not annotated:
        raise AnnotationError(f"{path}: split {split!r} lists {len(selected)} videos but none has an annotation "
                              "(no caption/question rows for them); use a file that includes that split's "
                              "annotations, or pick another split")
    return selected


def read_annotations(path: str | Path, fmt: str | None = None, split: str | None = None) -> list[Record]:
    """Read any supported annotation file into Records; `fmt` (a `FORMATS` name) skips detection;
    `split` keeps only the records of that split, for formats that carry splits (`SPLIT_FIELDS`:
    MSRVTT_data.json's train / validate / test); asking a split of any other format is an error."""
    return read_annotations_with_format(path, fmt, split)[1]


def read_annotations_with_format(path: str | Path, fmt: str | None = None,
                                 split: str | None = None) -> tuple[str, list[Record]]:
    """Like `read_annotations`, also returning the format name used (for reports such as `evl data check`)."""
    fmt, records = _read_with_format(path, fmt)
    return fmt, (select_split(records, split, path, fmt) if split is not None else records)


def _read_with_format(path: str | Path, fmt: str | None = None) -> tuple[str, list[Record]]:
    """Parse with the given or detected format.

    JSON is parsed once here even when the format is detected, because real files (MSRVTT, STAR) are
    tens of MB.
    """
    path = Path(path)
    if fmt is not None:
        if fmt not in FORMATS:
            raise AnnotationError(f"unknown annotation format {fmt!r}; valid formats: {', '.join(FORMATS)}")
        return fmt, FORMATS[fmt](path)
    if _is_tabular(path):
        fmt = _detect_csv(path)
        return fmt, FORMATS[fmt](path)
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        data = _load_json(path)
        fmt = _detect_json(data, path)
        return fmt, _JSON_BUILDERS[fmt](data, path)
    fmt = detect_format(path)  # raises: unknown extension
    return fmt, FORMATS[fmt](path)
