"""Evaluating and asking a frame-QA model: accuracy from cached features (with which frames were read),
and `ask`, one question about one video from its frames (what `evl ask` and `evl.load(...).answer` run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evl.data.datasets import clip_key
from evl.errors import ConfigError
from evl.techniques.vlap.features import FeatureCollator, FeatureDataset, FrameFeatures, answer
from evl.techniques.vlap.frame_qa import FrameQAModel


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, videos: str | Path | None = None,
                        task: str = "qa") -> dict[str, Any]:
    """`evl vlap eval`: accuracy of a frame-QA checkpoint on an annotation file (QA or MC), reading the
    frames it selects; the clips' features are extracted first (not cached)."""
    from evl.checkpoint import read_config
    from evl.data.annotations import read_annotations
    from evl.data.text import tokenizer_for
    from evl.techniques.vlap.features import extract_features

    checkpoint, data = Path(checkpoint), Path(data)
    if task not in ("qa", "mc"):
        raise ConfigError(f"--task {task}: must be qa or mc")
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such annotation file")
    config = read_config(checkpoint)
    if config.get("kind") != "frame_qa":
        raise ConfigError(f"{checkpoint} holds a video-language model, not a frame-QA model (kind 'frame_qa'): "
                          "train one with `evl vlap train`, or evaluate this one with `evl eval`")
    model = FrameQAModel.from_pretrained(checkpoint)
    trained_on = config.get("metadata", {}).get("task", task)
    if trained_on != task:
        raise ConfigError(f"{checkpoint} was trained for task {trained_on}; evaluate it with --task {trained_on}")
    records = read_annotations(data)
    check_task(records, task, str(data))
    feats = extract_features(model, records, videos_dir(str(videos) if videos else None, data, records), None)
    return evaluate_features(model, records, feats, tokenizer_for(model.cfg, checkpoint),
                             FrameQAModel.read_vocab(checkpoint), task)


def videos_dir(videos: str | None, annotation: str | Path, records: list) -> str:
    """The folder the annotation's video paths are relative to: as given, or guessed beside the file."""
    from evl.data.check import guess_videos_dir

    return str(videos) if videos is not None else str(guess_videos_dir(annotation, records))


def check_task(records: list, task: str, path: str) -> None:
    from evl.tasks.registry import get_task

    get_task(task).check_records(records, path)


@torch.no_grad()
def evaluate_features(model: FrameQAModel, records: list, feats: FrameFeatures, tokenizer, vocab, task: str,
                      batch_size: int = 64, max_text_len: int = 32, keep_picks: bool = False) -> dict[str, Any]:
    """Accuracy (overall and per question type) from pre-extracted features; which frames were picked:
    `distinct_frame_sets_per_clip` (QA: how many different candidate sets a clip's questions got — 1.0
    means the question never changes the selection) and, with `keep_picks`, every record's picks
    (`picks`: candidate indices in temporal order) and whether it was answered right (`correct`, 0/1),
    in the order of the dataset's records."""
    from evl.tasks.evaluate import AnswerTally

    if task == "qa" and vocab is None:
        raise ConfigError("open-ended QA evaluation needs the checkpoint's answers.json (the model was not trained "
                          "on open-ended QA: evaluate it with task mc)")
    model.eval()
    dataset = FeatureDataset(records, feats, "none" if task == "mc" else "question", train=False)
    collate = FeatureCollator(tokenizer, max_text_len)
    tally, picks = AnswerTally(task, vocab, missing_type="unknown"), []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        scores, out = answer(model, batch, task)
        tally.add(scores, batch)
        if task == "qa":
            picks.extend([i for i, ok in zip(row, ok_row, strict=True) if ok] for row, ok_row
                         in zip(out.selection.index.tolist(), out.selection.mask.tolist(), strict=True))
    result: dict[str, Any] = {"count": len(dataset), "skipped_undecodable": len(records) - len(dataset)}
    acc = tally.metrics()
    if task == "mc":
        result["mc_accuracy"] = acc["accuracy"]
    else:
        result.update(qa_accuracy=acc["accuracy"], per_type=acc["per_type"], count_per_type=acc["count_per_type"])
        result["distinct_frame_sets_per_clip"] = distinct_sets_per_clip(
            [clip_key(r) for r in dataset.records], picks)
        if keep_picks:
            result["picks"] = picks
            result["correct"] = [int(a == b) for a, b in zip(tally.preds, tally.gold, strict=True)]
    result["frames_read"] = model.cfg.num_frames
    return result


def distinct_sets_per_clip(clips: list[str], picks: list[list[int]]) -> float | None:
    """Mean over clips with ≥ 2 questions of the number of different frame sets their questions got."""
    sets: dict[str, set[tuple[int, ...]]] = {}
    counts: dict[str, int] = {}
    for clip, p in zip(clips, picks, strict=True):
        sets.setdefault(clip, set()).add(tuple(sorted(p)))
        counts[clip] = counts.get(clip, 0) + 1
    multi = [len(sets[c]) for c in sets if counts[c] > 1]
    return round(sum(multi) / len(multi), 3) if multi else None


# ------------------------------------------------------------------------------------------ asking


@dataclass
class AskResult:
    answer: str
    score: float
    alternatives: list[tuple[str, float]]
    frames: list[dict[str, float]]      # the frames the model read: candidate index, source frame, time (s)
    seconds: float


def ask(model: FrameQAModel, vocab, tokenizer, video: str | Path, question: str, top: int = 5,
        backend: str = "pyav", start: float | None = None, end: float | None = None) -> AskResult:
    """Answer `question` about `video` (or its window `start`–`end` seconds): N candidates sampled
    uniformly over the whole duration, k of them read."""
    from evl.data.transforms import VideoTransform
    from evl.data.video import load_clip

    if vocab is None:
        raise ConfigError("this frame-QA checkpoint has no answers.json: it was not trained on open-ended QA")
    if not question or not question.strip():
        raise ConfigError("the question is empty; ask e.g. \"what colour is the square?\"")
    t0 = time.perf_counter()
    cfg = model.cfg
    clip = load_clip(video, cfg.num_candidates, "uniform", backend=backend, start=start, end=end)
    frames = VideoTransform(size=cfg.video.image_size, train=False)(clip.frames)[None]
    tok = tokenizer([question], max_length=cfg.max_text_len)
    model.eval()
    with torch.no_grad():
        out = model(frames, clip.frame_mask[None], tok.input_ids, tok.attention_mask)
    probs = out.logits[0].softmax(dim=-1)
    values, ids = probs.topk(min(top, probs.numel()))
    sel = out.selection
    fps = clip.fps or 0.0
    frames_used = [{"candidate": int(i), "source_frame": int(clip.indices[int(i)]),
                    "time_s": round(clip.indices[int(i)] / fps, 3) if fps else None}
                   for i, ok in zip(sel.index[0].tolist(), sel.mask[0].tolist(), strict=True) if ok]
    alternatives = [(vocab.decode(int(i)), round(float(v), 4)) for v, i in zip(values, ids, strict=True)]
    return AskResult(alternatives[0][0], alternatives[0][1], alternatives[1:], frames_used,
                     round(time.perf_counter() - t0, 3))
