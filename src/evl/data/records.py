"""The one annotation record type (`Record`) and what every reader shares: row-level checks whose errors
name the file, row, field and value (`_Row`, `_text`, `_number`, ...) and safe loading of JSON, JSON Lines
and CSV files. The readers of each format are in `evl.data.annotations`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evl.errors import AnnotationError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")


@dataclass
class Record:
    """One annotated video (or clip): the unit every dataset and task consumes.

    `video` is the path as the annotation names it (with extension), relative to a videos folder or
    absolute; `source` is "file:row" so later errors can point back to the annotation row.
    """

    video: str
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answer: str | None = None
    options: list[str] | None = None
    answer_index: int | None = None
    start: float | None = None
    end: float | None = None
    qtype: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""

    @property
    def kind(self) -> str:
        """Task kind: "multiple_choice" (has options), "qa" (has a question) or "caption"."""
        if self.options:
            return "multiple_choice"
        if self.question is not None:
            return "qa"
        return "caption"


# ----------------------------------------------------------------------------- small helpers


class _Row:
    """Where a row came from, so every error message can name the file, row, line and field."""

    def __init__(self, path: Path, index: int, line: int | None = None, label: str = "row"):
        self.path, self.index, self.line, self.label = path, index, line, label

    @property
    def source(self) -> str:
        return f"{self.path}:{self.index}"

    def error(self, field_name: str, value: Any, expected: str) -> AnnotationError:
        where = f"{self.label} {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return AnnotationError(f"{self.path}: {where}: field {field_name!r} is {shown}; expected {expected}")


_MISSING = object()


def _get(row: dict, key: str, where: _Row) -> Any:
    value = row.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise where.error(key, None if value is _MISSING else value, "a value (the field is required)")
    return value


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text(value: Any, key: str, where: _Row) -> str:
    if not _is_text(value):
        raise where.error(key, value, "a non-empty string")
    return value


def _number(value: Any, key: str, where: _Row) -> float:
    """Parse seconds from a JSON number or a CSV string; bools are not numbers here."""
    if isinstance(value, bool):
        raise where.error(key, value, "a number (seconds)")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise where.error(key, value, "a number (seconds)") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise where.error(key, value, "a finite number (seconds)")
    return out


def _integer(value: Any, key: str, where: _Row) -> int:
    if isinstance(value, bool):
        raise where.error(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise where.error(key, value, "an integer")


def _with_ext(name: str) -> str:
    """Dataset ids (NExT-QA, STAR, MSRVTT, EgoClip) name videos without extension; files are .mp4."""
    return name if name.lower().endswith(VIDEO_EXTENSIONS) else f"{name}.mp4"


def _span(row: dict, start_key: str, end_key: str, where: _Row) -> tuple[float | None, float | None]:
    start = row.get(start_key)
    end = row.get(end_key)
    start = None if start in (None, "") else _number(start, start_key, where)
    end = None if end in (None, "") else _number(end, end_key, where)
    if start is not None and start < 0:
        raise where.error(start_key, start, "seconds >= 0")
    if start is not None and end is not None and end < start:
        raise where.error(end_key, end, f"seconds >= {start_key} ({start})")
    return start, end


def _answer_index(options: list[str], idx: int, key: str, where: _Row) -> int:
    if not 0 <= idx < len(options):
        raise where.error(key, idx, f"an option index in 0..{len(options) - 1}")
    return idx


def _match_answer(options: list[str], answer: str, key: str, where: _Row) -> int:
    """Find the answer among the options: exact first, then ignoring case and surrounding space."""
    if answer in options:
        return options.index(answer)
    folded = [o.strip().lower() for o in options]
    if answer.strip().lower() in folded:
        return folded.index(answer.strip().lower())
    raise where.error(key, answer, f"one of the choices {options}")


def _meta(row: dict, used: set[str]) -> dict:
    return {k: v for k, v in row.items() if k not in used}


# ----------------------------------------------------------------------------- file loading


def _read_text(path: Path) -> str:
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file not found; check the path")
    if path.is_dir():
        raise AnnotationError(f"{path}: is a folder; pass an annotation file (.json, .jsonl, .csv, .tsv)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    if not text.strip():
        raise AnnotationError(f"{path}: file is empty; expected annotation rows")
    return text


def _json_error(path: Path, e: json.JSONDecodeError, line_offset: int = 0) -> AnnotationError:
    return AnnotationError(
        f"{path}: invalid JSON at line {e.lineno + line_offset} column {e.colno}: {e.msg}; "
        "fix the syntax (a JSON list of objects, an object, or JSON Lines with one object per line)"
    )


def _parse_jsonl(path: Path, text: str) -> list:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise _json_error(path, e, line_offset=lineno - 1) from None
        except RecursionError:
            raise _too_deep(path, lineno) from None
    return rows


def _too_deep(path: Path, lineno: int | None = None) -> AnnotationError:
    at = f" (line {lineno})" if lineno else ""
    return AnnotationError(f"{path}{at}: JSON nested too deeply to be annotations (Python's parser gives up); "
                           "annotation rows are flat objects — check that this is the right file")


def _load_json(path: Path) -> Any:
    """Parse a JSON document, or JSON Lines (by .jsonl suffix, or a .json holding several documents)."""
    text = _read_text(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _parse_jsonl(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(path, text)
        raise _json_error(path, e) from None
    except RecursionError:
        raise _too_deep(path) from None


def _rows_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of {what} objects, got {type(data).__name__}")
    return data


def _sniff_delimiter(header: str) -> str:
    """EgoClip ships tab-separated '.csv' files, so decide by the header, not the extension."""
    return "\t" if header.count("\t") > header.count(",") else ","


def _guarded(reader: Any, path: Path) -> Iterator[dict]:
    """The reader's rows; csv's own errors (a field over its size limit, a NUL byte) name the line."""
    try:
        yield from reader
    except csv.Error as e:
        raise AnnotationError(f"{path}, line {reader.line_num + 1}: unreadable CSV ({e}); a caption this long or "
                              "with such bytes is not an annotation — fix or drop the row") from None


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[dict, _Row]]:
    """Yield (row dict, location); check the header has `required` and each row has the header's width."""
    text = _read_text(path)
    header_line = text.splitlines()[0]
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=_sniff_delimiter(header_line))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    missing = [c for c in required if c not in fields]
    if missing:
        raise AnnotationError(f"{path}: header (line 1) lacks column(s) {missing}; found {fields}; "
                              f"expected at least {list(required)}")
    for index, row in enumerate(_guarded(reader, path), start=1):
        where = _Row(path, index, reader.line_num)
        if None in row:
            raise where.error("(row width)", row[None], f"{len(fields)} fields like the header, got more")
        short = [k for k, v in row.items() if v is None]
        if short:
            raise where.error(short[0], None, f"{len(fields)} fields like the header, got fewer")
        yield row, where


def _nonempty(records: list[Record], path: Path) -> list[Record]:
    if not records:
        raise AnnotationError(f"{path}: no records; the file parsed but holds no annotation rows")
    return records
