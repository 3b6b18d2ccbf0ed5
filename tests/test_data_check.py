"""`check_annotations` and `evl data check` on a folder with good, missing, empty and fake videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evl.cli import app
from evl.data.annotations import Record
from evl.data.check import check_annotations, format_summary, guess_videos_dir, resolve_video_path
from evl.data.video_writer import write_video
from evl.errors import AnnotationError, VideoDecodeError


def make_dataset(root: Path) -> Path:
    """SynthVL layout: root/annotations/ann.json + root/videos/{good,empty,fake}.mp4 (missing.mp4 absent)."""
    videos = root / "videos"
    frames = np.random.default_rng(0).integers(0, 255, size=(4, 16, 16, 3), dtype=np.uint8)
    write_video(videos / "good.mp4", frames)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "fake.mp4").write_text("this is not a video")
    ann = root / "annotations" / "ann.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps([
        {"video": "good.mp4", "caption": "a"},
        {"video": "good.mp4", "question": "q?", "answer": "x", "type": "what"},
        {"video": "missing.mp4", "question": "q?", "answer": "y", "type": "why"},
        {"video": "empty.mp4", "caption": ["c", "d"], "answer": 0},
        {"video": "fake.mp4", "question": "q?", "answer": "z", "type": "what"},
    ]))
    return ann


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth"))


def test_check_counts_every_problem(dataset):
    s = check_annotations(dataset)
    assert s["format"] == "lavis"
    assert Path(s["videos_dir"]) == (dataset.parent.parent / "videos").resolve()
    assert (s["records"], s["videos"], s["ok"], s["missing"], s["undecodable"]) == (5, 4, 1, 1, 2)
    assert s["types"] == {"caption": 1, "multiple_choice": 1, "what": 2, "why": 1}
    assert s["kinds"] == {"caption": 1, "multiple_choice": 1, "qa": 3}
    assert [e["video"] for e in s["missing_examples"]] == ["missing.mp4"]
    assert s["missing_examples"][0]["reason"] == "file not found"
    bad = {e["video"]: e["reason"] for e in s["undecodable_examples"]}
    assert set(bad) == {"empty.mp4", "fake.mp4"}
    assert "0 bytes" in bad["empty.mp4"] and bad["fake.mp4"]
    json.dumps(s)  # the summary must be JSON-serialisable for --json


def test_check_without_decoding_only_checks_existence(dataset):
    s = check_annotations(dataset, decode=False)
    assert (s["ok"], s["missing"], s["undecodable"], s["decoded"]) == (2, 1, 1, False)


def test_explicit_videos_dir_and_wrong_one(dataset, tmp_path):
    s = check_annotations(dataset, videos_dir=dataset.parent.parent / "videos")
    assert s["missing"] == 1
    s = check_annotations(dataset, videos_dir=tmp_path, decode=False)
    assert s["missing"] == 4 and s["ok"] == 0
    assert len(s["missing_examples"]) == 4


def test_decoder_failures_are_counted_not_raised(dataset, monkeypatch):
    import evl.data.video as video

    def boom(path, *a, **k):
        if Path(path).name == "good.mp4":
            raise VideoDecodeError(path, "moov atom not found")
        raise RuntimeError("unexpected")

    monkeypatch.setattr(video, "verify_video", boom)
    s = check_annotations(dataset)
    assert s["undecodable"] == 3 and s["ok"] == 0
    reasons = {e["video"]: e["reason"] for e in s["undecodable_examples"]}
    assert reasons["good.mp4"] == "moov atom not found"
    assert reasons["fake.mp4"] == "RuntimeError: unexpected"


def test_unparseable_annotation_raises(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(AnnotationError, match="invalid JSON"):
        check_annotations(bad)


def test_guess_videos_dir_prefers_the_folder_holding_the_videos(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "videos").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "videos" / name).write_bytes(b"x")
    recs = [Record(video="a.mp4"), Record(video="b.mp4")]
    assert guess_videos_dir(tmp_path / "ann.json", recs) == (tmp_path / "videos").resolve()
    assert guess_videos_dir(tmp_path / "ann.json", [Record(video="zzz.mp4")]) == tmp_path.resolve()


def test_resolve_video_path(tmp_path):
    assert resolve_video_path(Record(video="x/a.mp4"), tmp_path) == tmp_path / "x" / "a.mp4"
    absolute = str(tmp_path / "b.mp4")
    assert resolve_video_path(Record(video=absolute), "/elsewhere") == Path(absolute)
    assert resolve_video_path(Record(video="c.mp4"), None) == Path("c.mp4")


def test_format_summary_is_a_readable_table(dataset):
    text = format_summary(check_annotations(dataset))
    lines = text.splitlines()
    assert lines[1].split() == ["format", "lavis"]
    assert any(line.split() == ["missing", "1"] for line in lines)
    assert any(line.split() == ["undecodable", "2"] for line in lines)
    assert "missing videos (first 1 of 1):" in text and "missing.mp4: file not found" in text
    assert any(line.split() == ["what", "2"] for line in lines)


runner = CliRunner()


def test_cli_data_check_table_and_json(dataset):
    result = runner.invoke(app, ["data", "check", str(dataset)])
    assert result.exit_code == 1, result.output   # missing / undecodable videos: a script can gate on it
    assert "undecodable" in result.output and "missing.mp4" in result.output
    assert "3 of 4 videos are missing or undecodable" in result.output
    result = runner.invoke(app, ["data", "check", str(dataset), "--json", "--allow-bad",
                                 "--videos", str(dataset.parent.parent / "videos"), "--format", "lavis"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output.splitlines()[0])
    assert {"records", "videos", "missing", "undecodable", "format", "types",
            "missing_examples", "undecodable_examples"} <= set(s)
    assert (s["missing"], s["undecodable"]) == (1, 2)


def test_cli_data_check_fails_on_unparseable_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    result = runner.invoke(app, ["data", "check", str(bad)])
    assert result.exit_code != 0
    assert "cannot tell the format" in result.output
    result = runner.invoke(app, ["data", "check", str(bad), "--format", "nope"])
    assert result.exit_code != 0 and "valid formats" in result.output


def test_cli_data_formats_lists_every_reader():
    result = runner.invoke(app, ["data", "formats"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert names == ["lavis", "msrvtt", "nextqa", "star", "webvid", "egoclip"]


# ----------------------------------------------------------------------------- splits (MSRVTT_data.json)


def make_msrvtt(root: Path) -> Path:
    """root/MSRVTT_data.json: 3 train, 1 validate, 2 test videos (2 captions each); the train and test
    videos exist as (undecoded) files under root/videos, the validate one is missing."""
    splits = ["train"] * 3 + ["validate"] + ["test"] * 2
    (root / "videos").mkdir(parents=True)
    for i, s in enumerate(splits):
        if s != "validate":
            (root / "videos" / f"video{i}.mp4").write_bytes(b"not decoded in these tests")
    path = root / "MSRVTT_data.json"
    path.write_text(json.dumps({
        "videos": [{"video_id": f"video{i}", "split": s} for i, s in enumerate(splits)],
        "sentences": [{"video_id": f"video{i}", "caption": f"c{i}.{c}"} for c in range(2) for i in range(6)],
    }))
    return path


def test_check_reports_counts_per_split(tmp_path):
    s = check_annotations(make_msrvtt(tmp_path), decode=False)
    assert s["format"] == "msrvtt" and s["split"] is None
    assert s["splits"] == {"train": {"records": 3, "videos": 3}, "validate": {"records": 1, "videos": 1},
                           "test": {"records": 2, "videos": 2}}
    assert (s["records"], s["videos"], s["ok"], s["missing"]) == (6, 6, 5, 1)
    text = format_summary(s)
    assert "splits" in text.splitlines()
    assert any(line.split() == ["validate", "1", "records,", "1", "videos"] for line in text.splitlines())


def test_check_one_split_counts_only_that_split(tmp_path):
    s = check_annotations(make_msrvtt(tmp_path), decode=False, split="train")
    assert s["split"] == "train" and s["splits"] == {"train": {"records": 3, "videos": 3}}
    assert (s["records"], s["videos"], s["ok"], s["missing"]) == (3, 3, 3, 0)
    with pytest.raises(AnnotationError, match=r"has splits train \(3 videos\), validate \(1\), test \(2\); "
                                              r"got 'val'; did you mean 'validate'"):
        check_annotations(tmp_path / "MSRVTT_data.json", decode=False, split="val")


def test_check_formats_without_splits_report_none(dataset):
    s = check_annotations(dataset, decode=False)
    assert s["splits"] == {} and s["split"] is None
    assert "splits" not in format_summary(s).splitlines()
    with pytest.raises(AnnotationError, match="the lavis format carries no split; drop the split option"):
        check_annotations(dataset, decode=False, split="test")


def test_cli_data_check_split(tmp_path, monkeypatch):
    import evl.data.check as check

    monkeypatch.setattr(check, "_verify", lambda path: None)  # the fixture's files are not real videos
    ann = make_msrvtt(tmp_path)
    result = runner.invoke(app, ["data", "check", str(ann), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert (s["split"], s["records"], s["videos"], s["ok"]) == ("test", 2, 2, 2)
    assert s["splits"] == {"test": {"records": 2, "videos": 2}}
    result = runner.invoke(app, ["data", "check", str(ann), "--split", "test"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ["split", "test"] in [line.split() for line in lines]
    assert ["records", "2"] in [line.split() for line in lines]
    assert ["test", "2", "records,", "2", "videos"] in [line.split() for line in lines]
    assert not any(line.split()[:1] in (["train"], ["validate"]) for line in lines)
    result = runner.invoke(app, ["data", "check", str(ann), "--split", "val"])
    assert result.exit_code == 2
    assert "did you mean 'validate'" in result.output
    help_text = runner.invoke(app, ["data", "check", "--help"]).output
    assert "--split" in help_text and "MSRVTT_data.json" in help_text
