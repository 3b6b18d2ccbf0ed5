"""Annotation readers: each format on a tiny fixture, detection, and every malformed-row error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evl.data.annotations import (
    FORMATS,
    SPLIT_FIELDS,
    Record,
    detect_format,
    read_annotations,
    read_annotations_with_format,
    split_sizes,
)
from evl.errors import AnnotationError


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


NEXTQA_HEADER = "video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4"
WEBVID_HEADER = "videoid,contentUrl,duration,page_dir,name"
EGOCLIP_HEADER = "video_uid\tvideo_dur\tclip_start\tclip_end\tclip_text\ttag_verb\ttag_noun"


# ----------------------------------------------------------------------------- readers


def test_lavis_retrieval_caption_string_and_list(tmp_path):
    path = write_json(tmp_path / "ret.json", [
        {"video": "v1.mp4", "caption": "a dog runs"},
        {"video": "v2.mp4", "caption": ["one", "two"], "id": 7},
    ])
    recs = read_annotations(path)
    assert recs[0] == Record(video="v1.mp4", captions=["a dog runs"], source=f"{path}:1")
    assert recs[1].captions == ["one", "two"] and recs[1].meta == {"id": 7}
    assert recs[1].kind == "caption" and recs[1].question is None


def test_lavis_qa_and_multiple_choice(tmp_path):
    path = write_json(tmp_path / "qa.json", [
        {"video": "v1.mp4", "question": "what runs?", "answer": "dog", "type": "what"},
        {"video": "v2.mp4", "caption": ["a cat", "a dog", "a cow"], "answer": 1},
    ])
    qa, mc = read_annotations(path)
    assert (qa.question, qa.answer, qa.qtype, qa.kind) == ("what runs?", "dog", "what", "qa")
    assert qa.options is None and qa.answer_index is None
    assert mc.options == ["a cat", "a dog", "a cow"] and mc.captions == []
    assert (mc.answer_index, mc.answer, mc.kind) == (1, "a dog", "multiple_choice")


def test_lavis_extra_keys_go_to_meta_and_clip_span(tmp_path):
    path = write_json(tmp_path / "e.json", [
        {"video": "v.mp4", "caption": "x", "verbs": [1, 2], "nouns": [3], "start": 1.5, "end": 4}])
    (rec,) = read_annotations(path)
    assert rec.meta == {"verbs": [1, 2], "nouns": [3]}
    assert (rec.start, rec.end) == (1.5, 4.0)


def test_jsonl_and_json_with_several_documents(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", '{"video": "a.mp4", "caption": "x"}', "",
                    '{"video": "b.mp4", "caption": "y"}')
    b = write_lines(tmp_path / "b.json", '{"video": "a.mp4", "caption": "x"}',
                    '{"video": "b.mp4", "caption": "y"}')
    for path in (a, b):
        assert [r.video for r in read_annotations(path)] == ["a.mp4", "b.mp4"]
        assert detect_format(path) == "lavis"


def test_msrvtt_official_groups_captions_per_video(tmp_path):
    path = write_json(tmp_path / "MSRVTT_data.json", {
        "info": {}, "videos": [{"video_id": "video0", "split": "train", "category": 9},
                               {"video_id": "video1", "split": "test"}],
        "sentences": [{"video_id": "video0", "caption": "a", "sen_id": 0},
                      {"video_id": "video1", "caption": "b", "sen_id": 1},
                      {"video_id": "video0", "caption": "c", "sen_id": 2}],
    })
    fmt, recs = read_annotations_with_format(path)
    assert fmt == "msrvtt"
    assert [r.video for r in recs] == ["video0.mp4", "video1.mp4"]
    assert recs[0].captions == ["a", "c"] and recs[1].captions == ["b"]
    assert recs[0].meta["split"] == "train" and recs[0].meta["sen_ids"] == [0, 2]
    assert recs[0].meta["category"] == 9


def test_nextqa_csv(tmp_path):
    path = write_lines(tmp_path / "val.csv", NEXTQA_HEADER,
                       '4010069381,1200,640,480,why did the boy run,2,6,CW,a,b,"c, really",d,e')
    (rec,) = read_annotations(path)
    assert rec.video == "4010069381.mp4"
    assert rec.options == ["a", "b", "c, really", "d", "e"]
    assert (rec.answer_index, rec.answer, rec.qtype) == (2, "c, really", "CW")
    assert rec.meta == {"frame_count": 1200, "width": 640, "height": 480, "qid": "6"}
    assert rec.source == f"{path}:1"


def test_star_json_dict_and_string_choices(tmp_path):
    path = write_json(tmp_path / "STAR_val.json", [
        {"question_id": "Interaction_T1_13", "question": "Which object?", "video_id": "6H78U",
         "start": 11.1, "end": 19.6, "answer": "The closet/cabinet.",
         "choices": [{"choice_id": 0, "choice": "The table."}, {"choice_id": 1, "choice": "The closet/cabinet."}]},
        {"question_id": "Sequence_T3_2", "question": "What next?", "video_id": "AB12C",
         "start": 0, "end": 3, "answer": "took the cup.", "choices": ["Took the cup.", "Sat down."]},
        {"question_id": "Feasibility_T6_1", "question": "Test split?", "video_id": "X",
         "start": 0, "end": 1, "choices": ["a", "b"]},
    ])
    first, second, test = read_annotations(path)
    assert (first.video, first.qtype, first.answer_index) == ("6H78U.mp4", "Interaction", 1)
    assert (first.start, first.end) == (11.1, 19.6)
    assert first.meta["question_id"] == "Interaction_T1_13"
    assert second.answer_index == 0 and second.qtype == "Sequence"  # matched ignoring case
    assert test.answer is None and test.answer_index is None and test.options == ["a", "b"]
    assert detect_format(path) == "star"


def test_webvid_csv(tmp_path):
    path = write_lines(tmp_path / "results_2M_val.csv", WEBVID_HEADER,
                       '1053841541,https://x/y.mp4,PT00H00M11S,006001_006050,"Hello, world"')
    (rec,) = read_annotations(path)
    assert rec.video == "006001_006050/1053841541.mp4"
    assert rec.captions == ["Hello, world"]
    assert rec.meta["duration"] == 11.0 and rec.meta["contentUrl"] == "https://x/y.mp4"


def test_egoclip_tsv_and_csv(tmp_path):
    tsv = write_lines(tmp_path / "egoclip.csv", EGOCLIP_HEADER,
                      "002ad105\t1200.0\t3.5\t4.25\t#C C opens the door\t[3, 12]\t[7]")
    (rec,) = read_annotations(tsv)
    assert rec.video == "002ad105.mp4" and rec.captions == ["#C C opens the door"]
    assert (rec.start, rec.end) == (3.5, 4.25)
    assert rec.meta["verbs"] == [3, 12] and rec.meta["nouns"] == [7]
    assert rec.meta["video_dur"] == "1200.0"
    comma = write_lines(tmp_path / "ego2.csv", "video_uid,clip_start,clip_end,clip_text,tag_verb,tag_noun",
                        "u1,0,1,text,\"(1,)\",")
    (rec2,) = read_annotations(comma)
    assert rec2.meta["verbs"] == [1] and rec2.meta["nouns"] == []


# ----------------------------------------------------------------------------- registry + detection


def test_registry_docstrings_and_names():
    assert set(FORMATS) == {"lavis", "msrvtt", "nextqa", "star", "webvid", "egoclip"}
    for reader in FORMATS.values():
        assert reader.__doc__ and reader.__doc__.strip().splitlines()[0]


@pytest.mark.parametrize("name,header,expected", [
    ("a.csv", NEXTQA_HEADER, "nextqa"),
    ("b.csv", WEBVID_HEADER, "webvid"),
    ("c.tsv", EGOCLIP_HEADER, "egoclip"),
])
def test_detect_csv_by_header(tmp_path, name, header, expected):
    assert detect_format(write_lines(tmp_path / name, header)) == expected


def test_detect_json_kinds(tmp_path):
    assert detect_format(write_json(tmp_path / "a.json", [{"video": "x", "caption": "y"}])) == "lavis"
    assert detect_format(write_json(tmp_path / "b.json", {"videos": [], "sentences": []})) == "msrvtt"


def test_explicit_format_overrides_and_wrong_name_lists_valid(tmp_path):
    path = write_json(tmp_path / "a.json", [{"video": "x.mp4", "caption": "y"}])
    assert read_annotations(path, fmt="lavis")[0].video == "x.mp4"
    with pytest.raises(AnnotationError, match="unknown annotation format 'lavs'.*lavis, msrvtt, nextqa"):
        read_annotations(path, fmt="lavs")


@pytest.mark.parametrize("name,content,pattern", [
    ("u.txt", "hello", "unknown annotation file extension '.txt'"),
    ("h.csv", "foo,bar\n1,2\n", r"cannot tell the format from the header \['bar', 'foo'\]"),
    ("k.json", '[{"clip": 1}]', r"cannot tell the format from the keys \['clip'\]"),
    ("d.json", '{"a": 1}', "cannot tell the format of a JSON"),
])
def test_undetectable_files(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnnotationError, match=pattern):
        read_annotations(path)


# ----------------------------------------------------------------------------- file-level errors


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations(tmp_path / "nope.json")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(AnnotationError, match="is a folder"):
        read_annotations(tmp_path / "d.json")


@pytest.mark.parametrize("name", ["e.json", "e.csv", "e.jsonl"])
def test_empty_file(tmp_path, name):
    path = write_lines(tmp_path / name, "  ")
    with pytest.raises(AnnotationError, match=f"{name}: file is empty"):
        read_annotations(path)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"video": "a.mp4",\n   "caption" "x"}\n]')
    with pytest.raises(AnnotationError, match=r"bad.json: invalid JSON at line 3 column 14"):
        read_annotations(path)


def test_invalid_jsonl_names_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", '{"video": "a.mp4", "caption": "x"}', '{"video": ')
    with pytest.raises(AnnotationError, match="invalid JSON at line 2"):
        read_annotations(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"videoid,name,page_dir\n1,caf\xe9,p\n")
    with pytest.raises(AnnotationError, match="not UTF-8"):
        read_annotations(path)


@pytest.mark.parametrize("name,content,fmt", [
    ("z.json", "[]", None),
    ("z2.json", '{"videos": [], "sentences": []}', None),
    ("z.csv", NEXTQA_HEADER + "\n", None),
    ("z3.json", "[]", "star"),
])
def test_zero_records_is_an_error(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnnotationError, match="no records"):
        read_annotations(path, fmt=fmt)


def test_json_not_a_list_for_row_format(tmp_path):
    path = write_json(tmp_path / "o.json", {"video": "x"})
    with pytest.raises(AnnotationError, match="expected a JSON list of annotation objects, got dict"):
        read_annotations(path, fmt="lavis")


def test_csv_missing_required_column(tmp_path):
    path = write_lines(tmp_path / "w.csv", "videoid,name", "1,x")
    with pytest.raises(AnnotationError, match=r"header \(line 1\) lacks column\(s\) \['page_dir'\]"):
        read_annotations(path, fmt="webvid")


# ----------------------------------------------------------------------------- malformed rows


LAVIS_BAD_ROWS = [
    ("not an object", '"just a string"', "'\\(row\\)'", "a JSON object"),
    ("missing video", {"caption": "x"}, "'video' is None", "required"),
    ("empty video", {"video": "", "caption": "x"}, "'video' is ''", "a non-empty string"),
    ("caption type", {"video": "a", "caption": 3}, "'caption' is 3", "a non-blank string or a non-empty list of them"),
    ("caption list", {"video": "a", "caption": ["x", 2]}, "'caption'", "list of them"),
    ("nothing", {"video": "a", "id": 1}, "'caption' is None", "a 'caption' \\(retrieval\\)"),
    ("question type", {"video": "a", "question": 5, "answer": "x"}, "'question' is 5", "non-empty string"),
    ("answer type", {"video": "a", "question": "q", "answer": 1.5}, "'answer' is 1.5", "a non-blank string"),
    ("int answer without options", {"video": "a", "question": "q", "answer": 1}, "'answer' is 1", "candidates"),
    ("answer index out of range", {"video": "a", "caption": ["x", "y"], "answer": 2}, "'answer' is 2", "0..1"),
    ("answer not among options", {"video": "a", "options": ["x", "y"], "answer": "z"}, "'answer' is 'z'", "one of the choices"),
    ("start not a number", {"video": "a", "caption": "x", "start": "abc"}, "'start' is 'abc'", "a number"),
    ("start negative", {"video": "a", "caption": "x", "start": -1}, "'start' is -1", ">= 0"),
    ("end before start", {"video": "a", "caption": "x", "start": 5, "end": 2}, "'end' is 2", ">= start"),
    ("options type", {"video": "a", "options": "x", "question": "q"}, "'options' is 'x'", "list of non-blank strings"),
]


@pytest.mark.parametrize("label,row,field_pat,expected", LAVIS_BAD_ROWS, ids=[r[0] for r in LAVIS_BAD_ROWS])
def test_lavis_bad_row_errors_name_file_row_field_value(tmp_path, label, row, field_pat, expected):
    path = tmp_path / "ann.json"
    good = json.dumps({"video": "ok.mp4", "caption": "fine"})
    bad = row if isinstance(row, str) else json.dumps(row)
    path.write_text(f"[{good}, {bad}]")
    with pytest.raises(AnnotationError, match=rf"ann.json: row 2: field {field_pat}.*expected .*{expected}"):
        read_annotations(path, fmt="lavis")


MSRVTT_BAD = [
    ({"videos": [{"split": "train"}], "sentences": []}, r"videos row 1: field 'video_id' is None"),
    ({"videos": "x", "sentences": []}, r"expected a JSON list of 'videos' objects"),
    ({"videos": [{"video_id": "v0"}], "sentences": [{"video_id": "v9", "caption": "x"}]},
     r"sentences row 1: field 'video_id' is 'v9'; expected a video_id listed under 'videos'"),
    ({"videos": [{"video_id": "v0"}], "sentences": [{"video_id": "v0", "caption": ""}]},
     r"sentences row 1: field 'caption' is ''; expected a non-empty string"),
    ({"videos": [{"video_id": "v0"}], "sentences": ["x"]}, r"sentences row 1: field 'sentences\[\]'"),
]


@pytest.mark.parametrize("data,pattern", MSRVTT_BAD)
def test_msrvtt_bad_rows(tmp_path, data, pattern):
    with pytest.raises(AnnotationError, match=pattern):
        read_annotations(write_json(tmp_path / "m.json", data), fmt="msrvtt")


def test_msrvtt_wrong_layout(tmp_path):
    with pytest.raises(AnnotationError, match="MSRVTT_data.json layout"):
        read_annotations(write_json(tmp_path / "m.json", [{"video": "a"}]), fmt="msrvtt")


NEXTQA_BAD = [
    ("v1,10,2,2,q,x,1,CW,a,b,c,d,e", r"row 1 \(line 2\): field 'answer' is 'x'; expected an integer"),
    ("v1,10,2,2,q,7,1,CW,a,b,c,d,e", r"row 1 \(line 2\): field 'answer' is 7; expected an option index in 0..4"),
    ("v1,10,2,2,q,-1,1,CW,a,b,c,d,e", r"field 'answer' is -1; expected an option index in 0..4"),
    ("v1,10,2,2,,0,1,CW,a,b,c,d,e", r"field 'question' is ''; expected a non-empty string"),
    (",10,2,2,q,0,1,CW,a,b,c,d,e", r"field 'video' is ''"),
    ("v1,10,2,2,q,0,1,CW,a,,c,d,e", r"field 'a1' is ''"),
    ("v1,10,2,2,q,0,1,CW,a,b,c,d", r"field 'a4' is None; expected 13 fields like the header, got fewer"),
    ("v1,10,2,2,q,0,1,CW,a,b,c,d,e,f", r"field '\(row width\)' is \['f'\]; expected 13 fields like the header, got more"),
]


@pytest.mark.parametrize("line,pattern", NEXTQA_BAD)
def test_nextqa_bad_rows(tmp_path, line, pattern):
    path = write_lines(tmp_path / "n.csv", NEXTQA_HEADER, line)
    with pytest.raises(AnnotationError, match=rf"n.csv: .*{pattern}"):
        read_annotations(path)


def test_csv_line_number_counts_multiline_fields(tmp_path):
    path = write_lines(tmp_path / "w.csv", "videoid,name,page_dir", '1,"two\nlines",p', "2,,p")
    with pytest.raises(AnnotationError, match=r"row 2 \(line 4\): field 'name' is ''"):
        read_annotations(path)


STAR_BAD = [
    ({"question": "q", "video_id": "v", "choices": ["a"]}, "'question_id' is None"),
    ({"question_id": "X_1", "question": "q", "video_id": "v", "choices": []}, "'choices' is \\[\\]"),
    ({"question_id": "X_1", "question": "q", "video_id": "v", "choices": [{"choice_id": 0}]}, "'choices' is"),
    ({"question_id": "X_1", "question": "q", "video_id": "v", "choices": ["a"], "answer": "b"},
     "'answer' is 'b'; expected one of the choices \\['a'\\]"),
    ({"question_id": "X_1", "question": "q", "video_id": "v", "choices": ["a"], "start": "s"}, "'start' is 's'"),
]


@pytest.mark.parametrize("row,pattern", STAR_BAD)
def test_star_bad_rows(tmp_path, row, pattern):
    with pytest.raises(AnnotationError, match=rf"s.json: row 1: field {pattern}"):
        read_annotations(write_json(tmp_path / "s.json", [row]), fmt="star")


WEBVID_BAD = [
    ("1,u,PT1M,p,", "field 'name' is ''"),
    (",u,PT1M,p,x", "field 'videoid' is ''"),
    ("1,u,PT1M,,x", "field 'page_dir' is ''"),
    ("1,u,soon,p,x", "field 'duration' is 'soon'; expected a number"),
    ("1,u,PTxS,p,x", "field 'duration' is 'PTxS'; expected seconds or an ISO-8601 duration"),
]


@pytest.mark.parametrize("line,pattern", WEBVID_BAD)
def test_webvid_bad_rows(tmp_path, line, pattern):
    path = write_lines(tmp_path / "w.csv", WEBVID_HEADER, line)
    with pytest.raises(AnnotationError, match=rf"row 1 \(line 2\): {pattern}"):
        read_annotations(path)


EGOCLIP_BAD = [
    ("u\t1\tx\t2\tt\t[1]\t[2]", "field 'clip_start' is 'x'; expected a number"),
    ("u\t1\t\t2\tt\t[1]\t[2]", "field 'clip_start' is ''; expected a number"),
    ("u\t1\t3\t2\tt\t[1]\t[2]", "field 'clip_end' is 2.0; expected seconds >= clip_start"),
    ("u\t1\t1\t2\t\t[1]\t[2]", "field 'clip_text' is ''"),
    ("u\t1\t1\t2\tt\t__import__('os')\t[2]", "field 'tag_verb' is \"__import__\\('os'\\)\"; expected a list of integers"),
    ("u\t1\t1\t2\tt\t[1]\t['a']", "field 'tag_noun' is \"\\['a'\\]\"; expected a list of integers"),
    ("u\t1\t1\t2\tt\t[1]\t{1: 2}", "field 'tag_noun' is '\\{1: 2\\}'"),
]


@pytest.mark.parametrize("line,pattern", EGOCLIP_BAD)
def test_egoclip_bad_rows(tmp_path, line, pattern):
    path = write_lines(tmp_path / "ego.tsv", EGOCLIP_HEADER, line)
    with pytest.raises(AnnotationError, match=rf"ego.tsv: row 1 \(line 2\): {pattern}"):
        read_annotations(path)


# ----------------------------------------------------------------------------- splits


def write_msrvtt_splits(path: Path, sizes: dict[str, int], captions: int = 2) -> Path:
    """An MSRVTT_data.json with `sizes[split]` videos per split (ids in file order, like the official
    file) and `captions` sentences per video, the sentences listed round-robin as in the real file."""
    splits = [s for s, n in sizes.items() for _ in range(n)]
    videos = [{"video_id": f"video{i}", "split": s, "category": i % 3} for i, s in enumerate(splits)]
    sentences = [{"video_id": f"video{i}", "caption": f"clip {i} caption {c}", "sen_id": c * len(splits) + i}
                 for c in range(captions) for i in range(len(splits))]
    return write_json(path, {"info": {}, "videos": videos, "sentences": sentences})


SPLIT_SIZES = {"train": 4, "validate": 2, "test": 3}


def test_msrvtt_records_carry_their_split(tmp_path):
    path = write_msrvtt_splits(tmp_path / "MSRVTT_data.json", SPLIT_SIZES)
    recs = read_annotations(path)
    assert [r.meta["split"] for r in recs] == ["train"] * 4 + ["validate"] * 2 + ["test"] * 3
    assert split_sizes(recs, "msrvtt") == {"train": {"records": 4, "videos": 4},
                                           "validate": {"records": 2, "videos": 2},
                                           "test": {"records": 3, "videos": 3}}
    assert "msrvtt" in SPLIT_FIELDS and set(SPLIT_FIELDS) <= set(FORMATS)


def test_msrvtt_split_selects_exactly_that_split_with_its_captions(tmp_path):
    path = write_msrvtt_splits(tmp_path / "MSRVTT_data.json", SPLIT_SIZES)
    train = read_annotations(path, split="train")
    assert [r.video for r in train] == ["video0.mp4", "video1.mp4", "video2.mp4", "video3.mp4"]
    assert train[2].captions == ["clip 2 caption 0", "clip 2 caption 1"]
    assert train[2].meta["sen_ids"] == [2, 11]
    fmt, test = read_annotations_with_format(path, "msrvtt", split="test")
    assert fmt == "msrvtt" and [r.video for r in test] == ["video6.mp4", "video7.mp4", "video8.mp4"]
    assert {r.meta["split"] for r in test} == {"test"}
    assert not {r.video for r in train} & {r.video for r in test}


@pytest.mark.parametrize("asked,hint", [
    ("val", "did you mean 'validate'"),
    ("Test", "did you mean 'test'"),
    ("training", "did you mean 'train'"),
    ("xyz", "use one of train, validate, test"),
])
def test_unknown_split_lists_the_file_splits_with_sizes(tmp_path, asked, hint):
    path = write_msrvtt_splits(tmp_path / "MSRVTT_data.json", SPLIT_SIZES)
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, split=asked)
    msg = str(err.value)
    assert f"MSRVTT_data.json has splits train (4 videos), validate (2), test (3); got {asked!r}" in msg
    assert hint in msg


def test_split_on_a_format_without_splits_says_drop_the_option(tmp_path):
    path = write_json(tmp_path / "ret.json", [{"video": "a.mp4", "caption": "x"}])
    with pytest.raises(AnnotationError, match=r"ret.json: split 'train' was asked for, but the lavis format "
                                              r"carries no split; drop the split option"):
        read_annotations(path, split="train")
    # a stray 'split' key in LAVIS rows stays in meta but is not a split: say so
    path = write_json(tmp_path / "ret2.json", [{"video": "a.mp4", "caption": "x", "split": "train"}])
    assert read_annotations(path)[0].meta == {"split": "train"}
    with pytest.raises(AnnotationError, match="kept in record.meta but are not a split"):
        read_annotations(path, split="train")
    csv_path = write_lines(tmp_path / "val.csv", NEXTQA_HEADER, "v1,10,2,2,q,0,1,CW,a,b,c,d,e")
    with pytest.raises(AnnotationError, match="the nextqa format carries no split"):
        read_annotations(csv_path, split="val")


def test_msrvtt_split_field_problems(tmp_path):
    no_split = write_json(tmp_path / "a.json", {"videos": [{"video_id": "v0"}],
                                                "sentences": [{"video_id": "v0", "caption": "x"}]})
    assert "split" not in read_annotations(no_split)[0].meta
    with pytest.raises(AnnotationError, match=r"no entry has a split \(the 'split' of each entry in 'videos'"):
        read_annotations(no_split, split="train")
    partial = write_json(tmp_path / "b.json", {
        "videos": [{"video_id": "v0", "split": "train"}, {"video_id": "v1"}],
        "sentences": [{"video_id": "v0", "caption": "x"}, {"video_id": "v1", "caption": "y"}]})
    assert len(read_annotations(partial)) == 2  # reading without a split still works
    with pytest.raises(AnnotationError, match=r"b.json:videos\[2\]: video 'v1.mp4' has no 'split' while 1 other"):
        read_annotations(partial, split="train")
    bad = write_json(tmp_path / "c.json", {"videos": [{"video_id": "v0", "split": 3}], "sentences": []})
    with pytest.raises(AnnotationError, match=r"videos row 1: field 'split' is 3; expected a non-empty string"):
        read_annotations(bad)


def test_msrvtt_split_without_sentences_is_an_error(tmp_path):
    path = write_json(tmp_path / "m.json", {
        "videos": [{"video_id": "v0", "split": "train"}, {"video_id": "v1", "split": "test"}],
        "sentences": [{"video_id": "v0", "caption": "x"}]})
    assert len(read_annotations(path, split="train")) == 1
    with pytest.raises(AnnotationError, match="split 'test' lists 1 videos but none has an annotation"):
        read_annotations(path, split="test")


def test_msrvtt_duplicate_video_id_is_an_error(tmp_path):
    path = write_json(tmp_path / "m.json", {
        "videos": [{"video_id": "v0", "split": "train"}, {"video_id": "v0", "split": "test"}],
        "sentences": [{"video_id": "v0", "caption": "x"}]})
    with pytest.raises(AnnotationError, match=r"videos row 2: field 'video_id' is 'v0'; expected a video_id "
                                              r"listed once \(already at videos row 1\)"):
        read_annotations(path)
