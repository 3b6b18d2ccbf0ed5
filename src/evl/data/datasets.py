"""Torch datasets over annotation records, and the collator that turns samples into model batches.

One dataset class serves every task: a sample is the decoded clip of a record plus that record's text
fields. What the text is (a random caption, the question, the options) is the `text` setting. An
undecodable video gives `None` (the Trainer's collate drops and counts it; evaluation counts it too),
so one bad file never stops a run. Decoders are opened inside `__getitem__`, i.e. inside each
DataLoader worker, never shared across processes.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from evl.data import MAX_FRAMES
from evl.data.annotations import Record, read_annotations
from evl.data.frame_cache import frame_cache
from evl.data.transforms import VideoTransform
from evl.data.video import load_clip
from evl.errors import ConfigError, VideoDecodeError

log = logging.getLogger(__name__)

TextMode = Literal["caption", "question", "none"]


@dataclass
class DataConfig:
    """Annotation files (any format `evl data formats` lists) and how clips/texts are read."""

    train: str = ""                    # an annotation file, or tar shards: "SHARDS/{000000..000123}.tar" / SHARDS/
    val: str | None = None
    test: str | None = None
    videos: str | None = None          # folder video paths are relative to (default: guessed per file)
    format: str | None = None
    split: str | None = None           # for files that carry splits (MSRVTT_data.json): train | validate | test
    test_split: str | None = None      # the split data.test is read with (files that carry splits)
    num_frames: int | None = None      # default: the model's video.num_frames; at most MAX_FRAMES (256)
    max_text_len: int = 32
    backend: Literal["pyav", "decord"] = "pyav"
    shuffle_buffer: int = 1000         # training from shards: samples each loader stream shuffles among
    frame_cache_mb: float = 0          # decoded frames kept between epochs (evl.data.frame_cache); 0 = off

    def __post_init__(self) -> None:
        if self.frame_cache_mb < 0:
            raise ConfigError(f"data.frame_cache_mb={self.frame_cache_mb}: must be >= 0 MiB (0 switches the cache off)")
        if self.frame_cache_mb and self.backend != "pyav":
            raise ConfigError(f"data.frame_cache_mb={self.frame_cache_mb} keeps frames the PyAV backend decodes; "
                              f"data.backend is {self.backend!r}: set data.backend=pyav or data.frame_cache_mb=0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 1 sample (1 = shards in order)")
        # 0 must not read as "the model's default": None (the key left out) says that
        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"data.num_frames={self.num_frames}: must be a positive number of frames (a multiple "
                              "of the model's video.tubelet_size); leave it out to use the model's video.num_frames")
        if self.num_frames is not None and self.num_frames > MAX_FRAMES:
            raise ConfigError(f"data.num_frames={self.num_frames}: at most {MAX_FRAMES} frames per clip; lower it")
        if self.max_text_len < 1:
            raise ConfigError(f"data.max_text_len={self.max_text_len}: must be a positive number of tokens")


@dataclass
class ClipSettings:
    """How clips are read: frames per clip, square size, sampling (random for training, else uniform)."""

    num_frames: int = 8
    size: int = 64
    train: bool = False
    backend: str = "pyav"
    cache_mb: float = 0     # evl.data.frame_cache: decoded frames kept in this process (PyAV); 0 = off


def clip_key(record: Record) -> str:
    """Identity of the clip a record shows: the file plus its time window (clip-level annotations)."""
    if record.start is None and record.end is None:
        return record.video
    return f"{record.video}@{record.start}-{record.end}"


class VideoTextDataset(Dataset):
    """records → {"frames" (T,C,S,S) float, "frame_mask" (T,), "text", "video_name", "record", ...}.

    text="caption": a random caption of the record when training, the first one otherwise;
    text="question": the record's question; text="none": video only (e.g. to embed a gallery).
    """

    def __init__(self, records: list[Record], videos_dir: str | Path | None, clip: ClipSettings,
                 text: TextMode = "caption", replace_bad: int = 0):
        if not records:
            raise ValueError("the dataset has no records")
        self.replace_bad = replace_bad
        self.records = records
        self.videos_dir = Path(videos_dir) if videos_dir is not None else None
        self.clip = clip
        self.text = text
        self.transform = VideoTransform(size=clip.size, train=clip.train)
        if self.videos_dir is not None:
            warn_outside_videos_dir(records, self.videos_dir)

    @classmethod
    def from_file(cls, annotation: str | Path, videos_dir: str | Path | None, clip: ClipSettings,
                  text: TextMode = "caption", fmt: str | None = None, replace_bad: int = 0,
                  split: str | None = None) -> VideoTextDataset:
        from evl.data.check import guess_videos_dir

        records = read_annotations(annotation, fmt, split=split)
        videos_dir = videos_dir if videos_dir is not None else guess_videos_dir(annotation, records)
        return cls(records, videos_dir, clip, text, replace_bad)

    def __len__(self) -> int:
        return len(self.records)

    def video_path(self, record: Record) -> Path:
        p = Path(record.video).expanduser()
        return p if p.is_absolute() or self.videos_dir is None else self.videos_dir / p

    def load_frames(self, record: Record) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Normalised frames and frame mask, or None (logged) when the video cannot be decoded."""
        try:
            clip = load_clip(self.video_path(record), self.clip.num_frames,
                             "random" if self.clip.train else "uniform", start=record.start, end=record.end,
                             backend=self.clip.backend,
                             cache=frame_cache(self.clip.cache_mb) if self.clip.cache_mb else None)
        except VideoDecodeError as e:
            log.warning("skipping %s (%s): %s", record.video, record.source, e.reason)
            return None
        return self.transform(clip.frames), clip.frame_mask

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The sample, or None when its video is bad. With `replace_bad=N` (training) a bad sample is
        replaced by the next decodable record (up to N tries), marked `replaced_bad`: every rank then
        keeps its micro-batch size, which contrastive gathering and hard-negative mining need."""
        for offset in range(1 + self.replace_bad):
            # jump by a large prime: neighbouring records often name the same (bad) video
            sample = self._sample((index + offset * 7919) % len(self.records))
            if sample is not None:
                sample["replaced_bad"] = int(offset > 0)
                return sample
        return None

    def _sample(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        loaded = self.load_frames(record)
        if loaded is None:
            return None
        frames, mask = loaded
        sample: dict[str, Any] = {"frames": frames, "frame_mask": mask, "video_name": record.video,
                                  "clip_key": clip_key(record), "index": index}
        sample.update(record_text(record, self.text, self.clip.train))
        # a per-sample seed for batch transforms (MLM / video masks): drawn under the Trainer's RNG
        # seeded by (seed, epoch, index), so a sample's masks do not depend on which micro-batch,
        # rank or accumulation step it lands in
        sample["seed"] = random.getrandbits(62)
        return sample


def warn_outside_videos_dir(records: list[Record], videos_dir: Path) -> int:
    """Warn once when video paths (`../x.mp4`, or absolute paths) lead outside `videos_dir`: an
    annotation file can then make a run read any file the user can read. Returns how many do."""
    root = os.path.abspath(videos_dir)
    outside = []
    for r in records:
        path = os.path.expanduser(r.video)
        full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            outside.append(r)
    if outside:
        log.warning("%d of %d records name a video outside the videos folder %s (the first: %s, path %r); they "
                    "are read from there. Check the annotation file if that is not meant.", len(outside),
                    len(records), videos_dir, outside[0].source, outside[0].video)
    return len(outside)


def record_text(record: Record, text: TextMode, train: bool) -> dict[str, Any]:
    """A sample's text fields from its record: the caption (random in training) or the question and
    answer, the multiple-choice options, and the metadata tags (verbs, nouns) EgoNCE reads."""
    sample: dict[str, Any] = {}
    if text == "caption":
        if not record.captions:
            raise ValueError(f"{record.source}: record has no caption but the task needs one")
        sample["text"] = random.choice(record.captions) if train else record.captions[0]
    elif text == "question":
        if record.question is None:
            raise ValueError(f"{record.source}: record has no question but the task needs one")
        sample["text"] = record.question
        sample["answer"] = record.answer
        sample["qtype"] = record.qtype
    sample["verbs"] = list(record.meta.get("verbs", []))
    sample["nouns"] = list(record.meta.get("nouns", []))
    if record.options is not None:
        # question-answer MC (NExT-QA, STAR) scores "question + option"; caption MC the option alone
        q = record.question
        sample["options"] = [f"{q} {o}" for o in record.options] if q else list(record.options)
        sample["answer_index"] = record.answer_index
    return sample


class Collator:
    """Stack clips; tokenize texts (padding to the batch's longest); QA answer ids; then the batch
    transforms the loss terms asked for (MLM masking, video masks), in order.

    A class, not a closure, so DataLoader workers can pickle it. `answer_vocab` maps answers to class
    ids (unknown → -100, ignored by the loss). In training the Trainer calls it under an RNG seeded
    per batch, so what the transforms draw is reproducible and the same after a resume.
    `frame_mask` is None when no clip of the batch has a padded frame: then attention builds no mask
    and takes SDPA's unmasked fast path.
    """

    def __init__(self, tokenizer, max_text_len: int = 32, answer_vocab=None, transforms=()):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.answer_vocab = answer_vocab
        self.transforms = list(transforms)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        frame_mask = torch.stack([s["frame_mask"] for s in samples])
        batch: dict[str, Any] = {
            "frames": torch.stack([s["frames"] for s in samples]),
            "frame_mask": None if bool(frame_mask.all()) else frame_mask,
            "video_names": [s["video_name"] for s in samples],
            "clip_keys": [s["clip_key"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples]),
            "sample_seeds": torch.tensor([s.get("seed", 0) for s in samples], dtype=torch.long),
            "verbs": [s["verbs"] for s in samples],
            "nouns": [s["nouns"] for s in samples],
        }
        batch.update(self.text_fields(samples))
        for transform in self.transforms:
            batch = transform(batch)
        return batch

    def text_fields(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Token ids of the text, QA answers (and their ids), multiple-choice options of the samples."""
        batch: dict[str, Any] = {}
        if "text" in samples[0]:
            batch["texts"] = [s["text"] for s in samples]   # the strings, for transforms that rewrite them
            tok = self.tokenizer(batch["texts"], max_length=self.max_text_len)
            batch["input_ids"], batch["attention_mask"] = tok.input_ids, tok.attention_mask
        if "answer" in samples[0]:
            batch["answers"] = [s["answer"] for s in samples]
            batch["qtypes"] = [s["qtype"] for s in samples]
            if self.answer_vocab is not None:
                batch["answer_ids"] = torch.tensor([self.answer_vocab.encode(a) for a in batch["answers"]])
        if "options" in samples[0]:
            k = len(samples[0]["options"])
            if any(len(s["options"]) != k for s in samples):
                raise ValueError("multiple-choice records in one batch must have the same number of options")
            tok = self.tokenizer([o for s in samples for o in s["options"]], max_length=self.max_text_len)
            batch["option_ids"] = tok.input_ids.view(len(samples), k, -1)
            batch["option_mask"] = tok.attention_mask.view(len(samples), k, -1)
            batch["answer_index"] = torch.tensor([s["answer_index"] for s in samples])
        return batch
