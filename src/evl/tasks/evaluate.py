"""Evaluation loops over a model: retrieval (dual + fusion re-rank), open-ended QA, multiple choice.

Metrics themselves live in `tasks/retrieval.py` and `tasks/qa.py` (pure functions); this module only
feeds them. Undecodable videos are skipped and counted (`undecodable` in every result), never fatal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from evl.data.annotations import Record
from evl.data.datasets import ClipSettings, Collator, VideoTextDataset, clip_key
from evl.models.model import TextFeatures, VideoFeatures, VideoLanguageModel
from evl.tasks.objective import multiple_choice_scores
from evl.tasks.qa import AnswerVocab, majority_baseline, qa_accuracy
from evl.tasks.retrieval import chance_recall, rerank_t2v, retrieval_metrics, similarity_topk


@dataclass
class EvalSettings:
    batch_size: int = 32
    num_workers: int = 0
    rerank_k: int = 16          # fusion re-ranking of the dual top-k (0 = off)
    max_text_len: int = 32
    device: str = "auto"     # "auto": the GPU when there is one, else the CPU


def _resolve(s: EvalSettings) -> EvalSettings:
    """Settings with `device` made concrete ("auto" → cuda when available, else cpu)."""
    if s.device != "auto":
        return s
    return dataclasses.replace(s, device="cuda" if torch.cuda.is_available() else "cpu")


def clip_settings_for(model: VideoLanguageModel, num_frames: int | None = None) -> ClipSettings:
    v = model.cfg.video
    return ClipSettings(num_frames=num_frames or v.num_frames, size=v.image_size, train=False)


def _loader(dataset, collate, s: EvalSettings):
    """Batches with undecodable samples removed; yields (batch or None, number skipped)."""
    def collate_counting(samples):
        kept = [x for x in samples if x is not None]
        return (collate(kept) if kept else None), len(samples) - len(kept)

    return DataLoader(dataset, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers,
                      collate_fn=collate_counting)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _cat_features(parts: list, cls):
    fields = cls.__dataclass_fields__
    out = {}
    for f in fields:
        vals = [getattr(p, f) for p in parts]
        if f == "time_slots":
            out[f] = vals[0]
        elif vals[0] is None:
            out[f] = None
        else:
            out[f] = _pad_cat(vals)
    return cls(**out)


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 (text length differs between batches)."""
    if tensors[0].dim() < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    n = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))
        padded.append(torch.cat([t, pad], dim=1))
    return torch.cat(padded)


@torch.no_grad()
def evaluate_retrieval(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None,
                       tokenizer, settings: EvalSettings | None = None, num_frames: int | None = None) -> dict:
    """Text→video / video→text recall of the dual encoder, and t2v after fusion re-ranking of the top-k."""
    s = _resolve(settings or EvalSettings())
    model.eval().to(s.device)
    by_video: dict[str, list[str]] = {}
    first: dict[str, Record] = {}
    for r in records:   # one gallery item per clip: a video file with several windows gives several
        by_video.setdefault(clip_key(r), []).extend(r.captions)
        first.setdefault(clip_key(r), r)
    video_records = list(first.values())
    ds = VideoTextDataset(video_records, videos_dir, clip_settings_for(model, num_frames), text="none")
    # token-level features are kept (on the CPU) only when re-ranking needs them; otherwise just the
    # embeddings, so a 100k-clip gallery costs 100k × embed_dim floats
    rerank = min(s.rerank_k, len(video_records)) > 0 and model.cfg.fusion.kind != "none"
    feats, names, skipped = [], [], 0
    for batch, n_bad in _loader(ds, Collator(tokenizer), s):
        skipped += n_bad
        if batch is None:
            continue
        batch = _to(batch, s.device)
        f = model.video_features(batch["frames"], batch["frame_mask"])
        feats.append(f if rerank else VideoFeatures(f.emb, f.emb[:, :0], f.token_mask[:, :0]))
        names.extend(batch["clip_keys"])
    if not feats:
        raise ValueError("no video of the retrieval set could be decoded; run `evl data check` on the annotation")
    video = _cat_features(feats, VideoFeatures)
    captions, text_to_video = [], []
    for vi, name in enumerate(names):
        for c in by_video[name]:
            captions.append(c)
            text_to_video.append(vi)
    if not captions:
        raise ValueError("the retrieval set has no captions")
    tparts = []
    for i in range(0, len(captions), s.batch_size):
        tok = tokenizer(captions[i:i + s.batch_size], max_length=s.max_text_len)
        f = model.text_features(tok.input_ids.to(s.device), tok.attention_mask.to(s.device))
        tparts.append(f if rerank else TextFeatures(f.emb, f.emb[:, :0], f.attention_mask[:, :0]))
    text = _cat_features(tparts, TextFeatures)
    t2v = torch.tensor(text_to_video)
    out = retrieval_metrics(text.emb.float().cpu(), video.emb.float().cpu(), t2v, ties="pessimistic")
    out.update(num_videos=len(names), num_captions=len(captions), undecodable=skipped,
               chance_r1=chance_recall(len(names), 1), chance_r5=chance_recall(len(names), 5),
               chance_r10=chance_recall(len(names), 10))
    if rerank:
        out.update(_rerank(model, video, text, t2v, min(s.rerank_k, len(names)), s.batch_size))
    return out


def _rerank(model: VideoLanguageModel, video: VideoFeatures, text: TextFeatures, t2v: torch.Tensor, k: int,
            batch_size: int) -> dict:
    """Fusion re-ranking of each caption's dual top-k, two ways: by the matching log-odds alone
    (`rerank_*`) and by dual logit + matching log-odds (`ensemble_*`, EgoVLPv2's multiple-choice rule).
    The fusion encoder scores each of the Nt·k shortlisted pairs once; both rankings reuse the scores."""
    dual_top, top = similarity_topk(text.emb, video.emb, k)
    flat_t = torch.arange(top.shape[0]).repeat_interleave(k)
    flat_v = top.reshape(-1)
    log_odds = []
    for i in range(0, flat_t.numel(), batch_size * 4):
        logits = model.score_pairs(video.select(flat_v[i:i + batch_size * 4]), text.select(flat_t[i:i + batch_size * 4]))
        log_odds.append((logits[:, 1] - logits[:, 0]).float())
    fused = torch.cat(log_odds).view(-1, k)
    ensemble = fused + dual_top.float() * model.logit_scale().float()
    out = {}
    for prefix, table in (("rerank", fused), ("ensemble", ensemble)):

        def score_fn(ti: torch.Tensor, vi: torch.Tensor, table=table) -> torch.Tensor:
            # look the pair's precomputed score up: its column is where `vi` sits in text ti's top-k
            cols = (top[ti] == vi[:, None]).float().argmax(dim=1)
            return table[ti, cols]

        metrics = rerank_t2v(top, score_fn, t2v, batch_size=batch_size * 4, ties="pessimistic")
        out.update({f"{prefix}_{key}": v for key, v in metrics.items()})
    return out


@torch.no_grad()
def evaluate_qa(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None, tokenizer,
                vocab: AnswerVocab, settings: EvalSettings | None = None, train_records: list[Record] | None = None,
                num_frames: int | None = None) -> dict:
    """Open-ended QA accuracy overall and per question type (+ majority baselines from training answers)."""
    s = _resolve(settings or EvalSettings())
    model.eval().to(s.device)
    ds = VideoTextDataset(records, videos_dir, clip_settings_for(model, num_frames), text="question")
    preds, gold, types, skipped = [], [], [], 0
    for batch, n_bad in _loader(ds, Collator(tokenizer, s.max_text_len), s):
        skipped += n_bad
        if batch is None:
            continue
        batch = _to(batch, s.device)
        video = model.video_features(batch["frames"], batch["frame_mask"])
        question = model.text_features(batch["input_ids"], batch["attention_mask"])
        ids = model.answer(video, question).argmax(-1).tolist()
        preds.extend(vocab.decode(i) for i in ids)
        gold.extend(batch["answers"])
        types.extend(t or "all" for t in batch["qtypes"])
    if not preds:
        raise ValueError("no video of the QA set could be decoded; run `evl data check` on the annotation")
    out = qa_accuracy(preds, gold, types)
    out["undecodable"] = skipped
    if train_records:
        out["baseline"] = majority_baseline([r.answer for r in train_records], gold, types,
                                            train_types=[r.qtype or "all" for r in train_records])
    return out


@torch.no_grad()
def evaluate_mc(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None, tokenizer,
                settings: EvalSettings | None = None, num_frames: int | None = None) -> dict:
    """Multiple-choice accuracy: pick the option with the best dual+fusion score."""
    s = _resolve(settings or EvalSettings())
    model.eval().to(s.device)
    ds = VideoTextDataset(records, videos_dir, clip_settings_for(model, num_frames), text="none")
    correct, total, skipped, k = 0, 0, 0, 0
    for batch, n_bad in _loader(ds, Collator(tokenizer, s.max_text_len), s):
        skipped += n_bad
        if batch is None:
            continue
        batch = _to(batch, s.device)
        scores = multiple_choice_scores(model, batch["frames"], batch["frame_mask"], batch["option_ids"],
                                        batch["option_mask"])
        k = scores.shape[1]
        correct += int((scores.argmax(1) == batch["answer_index"]).sum())
        total += scores.shape[0]
    if total == 0:
        raise ValueError("no video of the multiple-choice set could be decoded")
    return {"accuracy": 100.0 * correct / total, "count": total, "chance": 100.0 / k, "undecodable": skipped}
