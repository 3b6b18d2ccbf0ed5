"""VLAP's frozen-tower features: extracted once per clip, cached on disk, read by training and evaluation.

The video and text towers of a frame-QA model are frozen, so their outputs for the N uniformly sampled
candidates of every clip are computed once (`extract_features`, cached under `feature_cache`, keyed by
the towers' weights, the clips and N) and training reads those (`FeatureDataset`): the usual practice of
video-QA work with frozen encoders. `answer` runs the trainable part (selector, QFormer, answerer) on a
feature batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from evl.data.datasets import ClipSettings, Collator, VideoTextDataset, clip_key, record_text
from evl.errors import ConfigError
from evl.techniques.vlap.frame_qa import FrameQAModel

log = logging.getLogger(__name__)


@dataclass
class FrameFeatures:
    """Frozen-tower outputs of N candidates per clip: tokens (C, N, 1+P, D), patches (C, N, P, D),
    frame_mask (C, N); `row[clip_key]` → row; `bad` lists the clips that could not be decoded."""

    tokens: torch.Tensor
    patches: torch.Tensor
    frame_mask: torch.Tensor
    row: dict[str, int]
    bad: dict[str, str]


def towers_fingerprint(model: FrameQAModel) -> str:
    """sha1 of the frozen towers' weights: features, teachers and students must share them."""
    h = hashlib.sha1()
    for name, t in sorted({**model.video.state_dict(prefix="video."), **model.text.state_dict(prefix="text.")}.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_key(model: FrameQAModel, dataset: VideoTextDataset, keys: list[str], backend: str) -> str:
    """The towers, the clips (their files' size and mtime too), N, the image size, the decoder and what
    a candidate position holds (`frame_input`)."""
    files = []
    for r in dataset.records:
        path = dataset.video_path(r)
        st = path.stat() if path.is_file() else None
        files.append([str(path.resolve()), st.st_size if st else None, st.st_mtime if st else None])
    h = hashlib.sha1(towers_fingerprint(model).encode())
    h.update(json.dumps([keys, files, model.cfg.num_candidates, model.cfg.video.image_size, backend,
                         model.cfg.frame_input]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_features(model: FrameQAModel, records: list, videos: str | None, cache: Path | None,
                     backend: str = "pyav", batch_size: int = 16) -> FrameFeatures:
    """Run the frozen video tower once over the N uniform candidates of every distinct clip."""
    from safetensors.torch import load_file

    from evl.checkpoint import atomic_write_json, atomic_write_safetensors

    clips = list({clip_key(r): r for r in records}.items())
    keys = [k for k, _ in clips]
    n = model.cfg.num_candidates
    settings = ClipSettings(num_frames=n, size=model.cfg.video.image_size, train=False, backend=backend)
    dataset = VideoTextDataset([r for _, r in clips], videos, settings, "none")
    path = cache / f"{_cache_key(model, dataset, keys, backend)}.safetensors" if cache is not None else None
    if path is not None and path.is_file() and path.with_suffix(".json").is_file():
        data = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        log.info("frame features from %s", path)
        return FrameFeatures(data["tokens"], data["patches"], data["frame_mask"].bool(), meta["row"], meta["bad"])
    tokens, patches, masks, row, bad = [], [], [], {}, {}
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(clips), batch_size):
        batch = [(keys[i], dataset[i]) for i in range(start, min(start + batch_size, len(clips)))]
        bad.update({k: "could not be decoded (see the log)" for k, s in batch if s is None})
        batch = [(k, s) for k, s in batch if s is not None]
        if not batch:
            continue
        frames = torch.stack([s["frames"] for _, s in batch]).to(device)
        mask = torch.stack([s["frame_mask"] for _, s in batch])
        tokens.append(model.frame_tokens(frames, None, mask.to(device)).cpu())
        patches.append(model.patch_embeddings(frames, mask.to(device)).cpu())
        masks.append(mask)
        row.update({k: len(row) + i for i, (k, _) in enumerate(batch)})
    if not row:
        raise ConfigError(f"none of the {len(clips)} clips could be decoded; check data.videos and `evl data check`")
    feats = FrameFeatures(torch.cat(tokens), torch.cat(patches), torch.cat(masks).bool(), row, bad)
    if path is not None:   # atomic, the index (.json) last: a crash never leaves a half cache behind
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path, {"tokens": feats.tokens.contiguous(), "patches": feats.patches.contiguous(),
                                        "frame_mask": feats.frame_mask.to(torch.uint8)})
        atomic_write_json(path.with_suffix(".json"), {"row": row, "bad": bad})
    return feats


class FeatureDataset(Dataset):
    """QA / MC records over pre-extracted features; records whose clip is undecodable are dropped."""

    def __init__(self, records: list, feats: FrameFeatures, text: str, train: bool):
        self.records = [r for r in records if clip_key(r) in feats.row]
        if not self.records:
            raise ConfigError("no record has a decodable clip")
        self.feats, self.text, self.train = feats, text, train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        j = self.feats.row[clip_key(record)]
        sample = {"tokens": self.feats.tokens[j], "patches": self.feats.patches[j],
                  "frame_mask": self.feats.frame_mask[j], "video_name": record.video, "index": index}
        sample.update(record_text(record, self.text, self.train))
        return sample


class FeatureCollator(Collator):
    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "patches", "frame_mask")}
        batch["video_names"] = [s["video_name"] for s in samples]
        batch["index"] = torch.tensor([s["index"] for s in samples])
        batch.update(self.text_fields(samples))
        return batch


def answer(model: FrameQAModel, batch: dict, task: str, progress: float = 1.0):
    """Answer logits (QA) or option scores (MC) of a feature batch → (scores, FrameQAOutput)."""
    if task == "mc":
        b, k, length = batch["option_ids"].shape
        rep = {key: batch[key].repeat_interleave(k, dim=0) for key in ("tokens", "patches", "frame_mask")}
        out = model.from_features(rep["tokens"], rep["patches"], rep["frame_mask"],
                                  batch["option_ids"].reshape(b * k, length),
                                  batch["option_mask"].reshape(b * k, length), progress, options=True)
        return out.logits.view(b, k), out
    out = model.from_features(batch["tokens"], batch["patches"], batch["frame_mask"], batch["input_ids"],
                              batch["attention_mask"], progress)
    return out.logits, out
