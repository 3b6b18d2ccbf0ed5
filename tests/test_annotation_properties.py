"""Property-based tests of the annotation readers: whatever a file holds, a reader either returns
valid records or raises its own AnnotationError — never another exception (issue 13).

The generated inputs are arbitrary JSON values (shaped like each format, with every field replaced by
any JSON value) and arbitrary CSV text under each format's header.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from evl.data.annotations import FORMATS, Record, read_annotations
from evl.errors import AnnotationError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**20) | st.floats(allow_nan=True) | \
    st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
KEYS = ["video", "caption", "question", "answer", "type", "qtype", "options", "start", "end", "question_id",
        "video_id", "choices", "split", "sen_id"]
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)
words = st.text(min_size=1, max_size=10)
plausible = words | st.lists(words, min_size=1, max_size=3) | st.integers(-1, 4) | json_values
# rows close to each format's shape, so that many parse and the records themselves are checked
near_rows = st.fixed_dictionaries({"video": words | json_values},
                                  optional={k: plausible for k in KEYS if k != "video"})
documents = (st.lists(near_rows, min_size=1, max_size=4) | st.lists(rows, max_size=4) | json_values |
             st.fixed_dictionaries({"videos": st.lists(rows, max_size=3) | json_values,
                                    "sentences": st.lists(rows, max_size=3) | json_values}))


def _valid(records: list[Record]) -> None:
    assert records
    for r in records:
        assert isinstance(r.video, str) and r.video.strip()
        assert all(isinstance(c, str) and c.strip() for c in r.captions)
        assert r.question is None or (isinstance(r.question, str) and r.question.strip())
        assert r.qtype is None or isinstance(r.qtype, str)
        if r.options is not None:
            assert all(isinstance(o, str) for o in r.options)
            if r.answer_index is not None:
                assert 0 <= r.answer_index < len(r.options)
        for t in (r.start, r.end):
            assert t is None or isinstance(t, float)


@pytest.mark.parametrize("fmt", [None, "lavis", "msrvtt", "star"])
@SETTINGS
@given(doc=documents)
@example(doc=[{"video": "a.mp4", "caption": ["a red ball", "it rolls"]}])
@example(doc=[{"video": "a.mp4", "question": "what?", "answer": "red", "type": "what"}])
def test_json_readers_return_records_or_their_own_error(tmp_path, fmt, doc):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    try:
        records = read_annotations(path, fmt)
    except AnnotationError:
        return
    _valid(records)


HEADERS = {"nextqa": ["video", "question", "answer", "a0", "a1", "type"],
           "webvid": ["videoid", "name", "page_dir", "duration"],
           "egoclip": ["video_uid", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"]}
cells = st.text(max_size=10) | st.integers(-5, 5).map(str) | st.sampled_from(["[1, 2]", "PT00H00M11S", "1e999", "nan",
                                                                              "[" * 50, "((1,),)", "\x00"])


@pytest.mark.parametrize("fmt", sorted(HEADERS))
@SETTINGS
@given(data=st.data())
def test_csv_readers_return_records_or_their_own_error(tmp_path, fmt, data):
    header = HEADERS[fmt]
    body = data.draw(st.lists(st.lists(cells, min_size=len(header) - 1, max_size=len(header) + 1), max_size=4))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    path = tmp_path / "a.csv"
    path.write_text(out.getvalue())
    try:
        records = FORMATS[fmt](path)
    except AnnotationError:
        return
    _valid(records)


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_text_in_an_annotation_file_is_records_or_an_annotation_error(tmp_path, text):
    for name in ("a.json", "a.jsonl", "a.csv", "a.tsv"):
        path = tmp_path / name
        path.write_text(text)
        try:
            _valid(read_annotations(path))
        except AnnotationError:
            pass
