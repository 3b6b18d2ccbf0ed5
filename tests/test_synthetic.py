"""SynthVL generator: determinism, splits, text/metadata consistency, rendering, files, CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evl.data.synth_render import COLOURS, SHAPES
from evl.data.synth_text import NUMBER_WORDS, SHAPE_WORDS, VERB_ANSWERS, answer_vocabulary
from evl.data.synthetic import (
    SynthConfig,
    generate_clip,
    generate_synthvl,
    heldout_combinations,
    long_config,
    write_synthvl,
)

SMALL = SynthConfig(frames=8, size=32)


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _colour_centroid(frame: np.ndarray, rgb) -> tuple[float, float, int]:
    """(x, y, pixel count) of pixels close to an object's colour: the background is grey, so this isolates it."""
    mask = np.abs(frame.astype(int) - np.asarray(rgb)).sum(-1) < 60
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


@pytest.fixture(scope="module")
def text_only() -> object:
    """A larger benchmark without pixels: fast, and enough clips for statistics."""
    return generate_synthvl(120, seed=3, cfg=SynthConfig(frames=16, size=64), render=False)


@pytest.fixture(scope="module")
def rendered() -> object:
    return generate_synthvl(30, seed=1, cfg=SynthConfig(frames=16, size=64))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs", [{"frames": 3}, {"size": 15}, {"size": 14}, {"size": 33}, {"max_objects": 0}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SynthConfig(**kwargs)


@pytest.mark.parametrize("clips,seed", [(0, 0), (-2, 0), (3, -1)])
def test_generate_rejects_bad_counts(tmp_path, clips, seed):
    with pytest.raises(ValueError):
        generate_synthvl(clips, seed=seed, cfg=SMALL, render=False)
    with pytest.raises(ValueError):
        write_synthvl(tmp_path, clips=clips, seed=seed, frames=8, size=32)


# ----------------------------------------------------------------------------- files and determinism


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_is_byte_deterministic_and_worker_independent(tmp_path):
    a = write_synthvl(tmp_path / "a", clips=6, seed=5, frames=8, size=32, workers=1)
    write_synthvl(tmp_path / "b", clips=6, seed=5, frames=8, size=32, workers=2)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys()
    assert {k for k in fa if k.startswith("videos/")} == {f"videos/clip_{i:05d}.mp4" for i in range(6)}
    for name in ("meta.json", "annotations/pretrain.json", "annotations/qa_test.json", "annotations/clips.json"):
        assert name in fa
    # annotations and meta: byte-identical; videos: identical decoded frames (the contract;
    # mp4 bytes are identical in practice too, but that is the encoder's promise, not ours)
    text = [k for k in fa if not k.startswith("videos/")]
    assert [k for k in text if fa[k] != fb[k]] == []
    for k in fa:
        if k.startswith("videos/"):
            assert np.array_equal(_decode(tmp_path / "a" / k), _decode(tmp_path / "b" / k)), k
    assert a["splits"] == {"train": 4, "val": 1, "test": 1}
    frames = _decode(tmp_path / "a" / "videos" / "clip_00000.mp4")
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, _decode(tmp_path / "b" / "videos" / "clip_00000.mp4"))
    # the file shows the in-memory clip, up to lossy compression (4×4-pooled to average out the noise)
    def pooled(x):
        return x.astype(float).reshape(8, 8, 4, 8, 4, 3).mean(axis=(2, 4))

    own = np.abs(pooled(frames) - pooled(generate_clip(SMALL, 5, 0).frames)).mean()
    other = np.abs(pooled(frames) - pooled(generate_clip(SMALL, 5, 1).frames)).mean()
    assert own < 4 and own < other / 3


def test_different_seeds_differ():
    a = generate_synthvl(8, seed=0, cfg=SMALL)
    b = generate_synthvl(8, seed=1, cfg=SMALL)
    assert a.annotations["retrieval_train.json"] != b.annotations["retrieval_train.json"]
    assert not np.array_equal(a.clips[0].frames, b.clips[0].frames)


def test_clip_regenerates_alone(rendered):
    for clip in (rendered.clips[0], rendered.clips[-1]):
        again = generate_clip(rendered.config, rendered.seed, clip.meta["index"], clip.meta["compositional"])
        np.testing.assert_array_equal(again.frames, clip.frames)
        assert again.captions == clip.captions
        assert {**again.meta, "split": clip.meta["split"]} == clip.meta


def test_annotation_files_in_memory_match_written(tmp_path):
    write_synthvl(tmp_path, clips=6, seed=2, frames=8, size=32, workers=1)
    data = generate_synthvl(6, seed=2, cfg=SMALL, render=False)
    for name, records in data.annotations.items():
        assert json.loads((tmp_path / "annotations" / name).read_text()) == records
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads(json.dumps(data.meta))


# ----------------------------------------------------------------------------- splits


def test_heldout_combinations_only_in_compositional_test(text_only):
    held = {tuple(h.values()) for h in text_only.meta["heldout_combinations"]}
    assert held == set(heldout_combinations(3, text_only.config.heldout_combinations)) and len(held) == 6
    seen_test = set()
    for clip in text_only.clips:
        triples = {(e["colour"], e["noun"], e["verb"]) for e in clip.meta["events"]}
        if clip.meta["split"] in ("train", "val"):
            assert not triples & held
        if clip.meta["compositional"]:
            assert clip.meta["split"] == "test" and triples & held
            seen_test |= triples & held
    assert seen_test
    tests = text_only.annotations["retrieval_test.json"]
    assert any(r["compositional"] for r in tests) and not all(r["compositional"] for r in tests)
    assert text_only.meta["splits"] == {"train": 84, "val": 12, "test": 24}


def test_pretrain_pairs_come_from_train_only(text_only):
    train = {r["video"] for r in text_only.annotations["retrieval_train.json"]}
    pairs = text_only.annotations["pretrain.json"]
    assert pairs and {p["video"] for p in pairs} == train
    by_video = {c.meta["video"]: c.meta for c in text_only.clips}
    for p in pairs[:50]:
        assert set(p["verbs"]) == {e["verb"] for e in by_video[p["video"]]["events"]}
        assert set(p["nouns"]) == {o["shape"] for o in by_video[p["video"]]["objects"]}


# ----------------------------------------------------------------------------- text


def test_captions_mention_every_object(text_only):
    for clip in text_only.clips:
        assert len(clip.captions) == 5 and len(set(clip.captions)) == 5
        for caption in clip.captions:
            for obj in clip.meta["objects"]:
                assert any(f"{obj['colour']} {w} " in caption for w in SHAPE_WORDS[obj["shape"]]), caption


def test_qa_types_and_answers_consistent(text_only):
    vocab = set(answer_vocabulary(3))
    assert set(text_only.meta["answer_vocabulary"]) == vocab
    by_video = {c.meta["video"]: c.meta for c in text_only.clips}
    records = [r for s in ("train", "val", "test") for r in text_only.annotations[f"qa_{s}.json"]]
    assert {r["type"] for r in records} == {"attribute", "action", "count", "temporal", "existence"}
    for r in records:
        meta = by_video[r["video"]]
        assert r["answer"] in vocab
        colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", r["question"])), None)
        if r["type"] == "count":
            assert r["answer"] == NUMBER_WORDS[len(meta["objects"])]
        elif r["subtype"] == "colour":
            assert r["answer"] in {o["colour"] for o in meta["objects"]}
        elif r["subtype"] == "shape":
            assert r["answer"] == next(o["shape"] for o in meta["objects"] if o["colour"] == colour)
        elif r["type"] == "action":
            assert r["answer"] == VERB_ANSWERS[next(e["verb"] for e in meta["events"] if e["colour"] == colour)]
        elif r["subtype"] in ("after", "before"):
            k = next(i for i, e in enumerate(meta["events"]) if e["colour"] == colour)
            other = meta["events"][k + 1 if r["subtype"] == "after" else k - 1]
            assert r["answer"] == VERB_ANSWERS[other["verb"]]
        elif r["subtype"] in ("first", "last"):
            assert r["answer"] == meta["events"][0 if r["subtype"] == "first" else -1]["colour"]
        elif r["subtype"] == "object":
            present = any(o["colour"] == colour and any(f"{colour} {w}?" in r["question"]
                                                        for w in SHAPE_WORDS[o["shape"]]) for o in meta["objects"])
            assert r["answer"] == ("yes" if present else "no")
    answers = Counter(r["answer"] for r in records)
    assert answers["yes"] == answers["no"]
    assert max(answers.values()) / len(records) < 0.25  # no dominant majority answer


def test_multiple_choice_has_one_true_option(text_only):
    positions = set()
    by_video = {c.meta["video"]: c for c in text_only.clips}
    for split in ("train", "val", "test"):
        for r in text_only.annotations[f"mc_{split}.json"]:
            options, answer = r["caption"], r["answer"]
            assert len(options) == 5 and len(set(options)) == 5
            assert options[answer] in by_video[r["video"]].captions
            assert all(o not in by_video[r["video"]].captions for i, o in enumerate(options) if i != answer)
            positions.add(answer)
    assert positions == set(range(5))


# ----------------------------------------------------------------------------- pixels and events


def test_events_windows_and_short_events(text_only):
    lengths = []
    for clip in text_only.clips:
        events = clip.meta["events"]
        assert 1 <= len(events) == len(clip.meta["objects"]) <= 3
        for a, b in zip(events, events[1:], strict=False):
            assert a["end"] <= b["start"]  # strictly ordered, non-overlapping
        for e in events:
            assert 0 <= e["start"] < e["end"] <= 16
            lengths.append(e["end"] - e["start"])
    assert any(2 <= n <= 4 for n in lengths) and max(lengths) >= 5
    assert {len(c.meta["objects"]) for c in text_only.clips} == {1, 2, 3}


def test_frames_shape_and_colours(rendered):
    for clip in rendered.clips[:5]:
        assert clip.frames.shape == (16, 64, 64, 3) and clip.frames.dtype == np.uint8
        for obj in clip.meta["objects"]:
            assert obj["colour"] in COLOURS and obj["shape"] in SHAPES


def test_moving_object_pixels_move(rendered):
    moves = [(c, e) for c in rendered.clips for e in c.meta["events"] if e["verb"] in ("move_left", "move_right")]
    assert moves
    for clip, e in moves[:4]:
        obj = clip.meta["objects"][e["object"]]
        x0, _, n0 = _colour_centroid(clip.frames[max(e["start"] - 1, 0)], obj["rgb"])
        x1, _, n1 = _colour_centroid(clip.frames[e["end"] - 1], obj["rgb"])
        assert n0 > 10 and n1 > 10
        sign = -1 if e["verb"] == "move_left" else 1
        assert sign * (x1 - x0) > 0.6 * e["amount"]


# ----------------------------------------------------------------------------- CLI


def test_cli_synth_writes_files(tmp_path):
    from typer.testing import CliRunner

    from evl.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--clips", "6", "--frames", "8", "--size", "32"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["clips"] == 6 and summary["records"]["retrieval_test.json"] == 1
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 6
    for name in ("pretrain", "retrieval_train", "qa_val", "mc_test", "clips"):
        assert json.loads((tmp_path / "annotations" / f"{name}.json").read_text())
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--size", "31"])
    assert bad.exit_code != 0 and "size" in bad.output


# ----------------------------------------------------------------------------- long clips (evl synth --long)


@pytest.fixture(scope="module")
def long_text_only() -> object:
    return generate_synthvl(60, seed=2, cfg=long_config(48), render=False)


def _event_at(meta: dict, window: list[int]) -> dict:
    return next(e for e in meta["events"] if [e["start"], e["end"]] == window)


def test_long_clips_have_3_to_5_short_events_with_idle_time(long_text_only):
    counts = set()
    for clip in long_text_only.clips:
        events = clip.meta["events"]
        counts.add(len(events))
        for a, b in zip(events, events[1:], strict=False):
            assert a["end"] <= b["start"]
        assert all(2 <= e["end"] - e["start"] <= 8 for e in events)
        assert sum(e["end"] - e["start"] for e in events) <= 40   # at least 8 of 48 frames with no event
    assert counts == {3, 4, 5}


def test_long_clips_are_deterministic_and_regenerate_alone(long_text_only):
    again = generate_synthvl(60, seed=2, cfg=long_config(48), render=False)
    assert again.annotations == long_text_only.annotations
    clip = long_text_only.clips[7]
    alone = generate_clip(long_config(48), 2, 7, clip.meta["compositional"])
    assert alone.captions == clip.captions and alone.moments == clip.moments
    frames = generate_clip(long_config(24, 32), 2, 7).frames
    assert frames.shape == (24, 32, 32, 3)


def test_long_captions_tell_one_moment_each(long_text_only):
    for clip in long_text_only.clips:
        assert len(clip.moments) == len(clip.captions) == 5
        for text, window in zip(clip.captions, clip.moments, strict=True):
            event = _event_at(clip.meta, window)
            assert re.search(rf"\b{event['colour']}\b", text)
            others = [e for e in clip.meta["events"] if e is not event]
            assert sum(bool(re.search(rf"\b{e['colour']}\b", text)) for e in others) <= 1   # at most the anchor
    record = long_text_only.annotations["retrieval_train.json"][0]
    assert record["moments"] == long_text_only.clips[0].moments


def test_long_questions_target_the_events_their_moments_name(long_text_only):
    by_video = {c.meta["video"]: c.meta for c in long_text_only.clips}
    records = [r for s in ("train", "val", "test") for r in long_text_only.annotations[f"qa_{s}.json"]]
    assert {"event", "order"} <= {r["type"] for r in records}
    order_answers = Counter()
    for r in (r for r in records if r["type"] in ("event", "order")):
        meta = by_video[r["video"]]
        first, second = (_event_at(meta, w) for w in r["moments"])
        assert first["start"] < second["start"]
        if r["subtype"] == "colour_after":   # the asked event comes right after the anchor
            assert meta["events"].index(second) == meta["events"].index(first) + 1 and "right after" in r["question"]
            assert r["answer"] == second["colour"] and f"the {second['colour']}" not in r["question"]
        elif r["subtype"] == "shape_before":
            assert r["answer"] == first["noun"] and "just before" in r["question"]
            assert meta["events"].index(second) == meta["events"].index(first) + 1
            assert f"the {second['colour']} object" in r["question"]
        else:
            named = sorted((r["question"].index(f" {e['colour']} "), e) for e in (first, second))
            said_first_before = named[0][1] is first
            assert r["answer"] == ("yes" if said_first_before == (r["subtype"] == "before") else "no")
            order_answers[r["answer"]] += 1
    assert 0.35 < order_answers["yes"] / sum(order_answers.values()) < 0.65


def test_long_multiple_choice_options_are_whole_clip_captions(long_text_only):
    for r in long_text_only.annotations["mc_test.json"]:
        assert len(set(r["caption"])) == 5 and r["negative_types"][r["answer"]] == "positive"


def test_long_config_and_cli_refuse_too_few_frames(tmp_path):
    from typer.testing import CliRunner

    from evl.cli import app

    with pytest.raises(ValueError, match="24"):
        long_config(16)
    with pytest.raises(ValueError, match="min_objects"):
        SynthConfig(frames=4, min_objects=3)
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--long", "--frames", "16"])
    assert bad.exit_code != 0 and "24" in bad.output
    zero = CliRunner().invoke(app, ["synth", str(tmp_path / "z"), "--frames", "0"])
    assert zero.exit_code != 0 and "frames" in zero.output
    ok = CliRunner().invoke(app, ["synth", str(tmp_path / "y"), "--long", "--clips", "4", "--frames", "24", "--size", "32"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "y" / "meta.json").read_text())["frames"] == 24
    assert any(r["type"] == "order" for r in json.loads((tmp_path / "y" / "annotations" / "qa_train.json").read_text()))
