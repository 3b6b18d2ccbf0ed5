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

from evl.config import MAX_POSITIONS, MAX_WORKERS, check_range
from evl.data.annotations import Record
from evl.data.answers import AnswerVocab
from evl.data.datasets import ClipSettings, Collator, VideoTextDataset, clip_key
from evl.models.model import TextFeatures, VideoFeatures, VideoLanguageModel
from evl.tasks.qa import majority_baseline, qa_accuracy
from evl.tasks.retrieval import chance_recall, rerank_t2v, retrieval_metrics, similarity_topk


@dataclass
class EvalSettings:
    batch_size: int = 32
    num_workers: int = 0
    rerank_k: int = 16          # fusion re-ranking of the dual top-k (0 = off)
    max_text_len: int = 32
    device: str = "auto"     # "auto": the GPU when there is one, else the CPU

    def __post_init__(self) -> None:
        check_range("eval.batch_size", self.batch_size, 1, 100_000)
        check_range("eval.num_workers", self.num_workers, 0, MAX_WORKERS)
        check_range("eval.rerank_k", self.rerank_k, 0, 100_000, " (0 switches fusion re-ranking off)")
        check_range("eval.max_text_len", self.max_text_len, 1, MAX_POSITIONS)


def _resolve(s: EvalSettings) -> EvalSettings:
    """Settings with `device` made concrete ("auto" → cuda when available, else cpu)."""
    if s.device != "auto":
        return s
    return dataclasses.replace(s, device="cuda" if torch.cuda.is_available() else "cpu")


def clip_settings_for(model: VideoLanguageModel, num_frames: int | None = None) -> ClipSettings:
    v = model.cfg.video
    return ClipSettings(num_frames=v.num_frames if num_frames is None else num_frames, size=v.image_size, train=False)


def _loader(dataset, collate, s: EvalSettings):
    """Batches with undecodable samples removed; yields (batch or None, number skipped)."""
    def collate_counting(samples):
        kept = [x for x in samples if x is not None]
        return (collate(kept) if kept else None), len(samples) - len(kept)

    return DataLoader(dataset, batch_size=s.batch_size, shuffle=False, num_workers=s.num_workers,
                      collate_fn=collate_counting)


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}



@dataclass
class ClipEmbeddings:
    """A gallery of clips: `keys[i]` (file, or file@start-end for a clip window) is embedded as
    `emb[i]`. `features` holds the token-level features too (on the CPU) when they were asked for
    (fusion re-ranking); `undecodable` counts the clips that could not be read."""

    keys: list[str]
    emb: torch.Tensor
    features: VideoFeatures | None
    undecodable: int


@torch.no_grad()
def embed_clips(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None,
                settings: EvalSettings | None = None, num_frames: int | None = None,
                keep_tokens: bool = False) -> ClipEmbeddings:
    """Embed every distinct clip of `records` with the dual encoder — the one gallery builder that
    retrieval evaluation and search share. One gallery item per clip: a video file with several
    annotated windows gives one item per window.

    Only the (N, E) embeddings are kept unless `keep_tokens` (then token features are moved to the
    CPU batch by batch, so a large gallery does not fill the accelerator's memory).
    """
    s = _resolve(settings or EvalSettings())
    model.eval().to(s.device)
    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(clip_key(r), r)
    ds = VideoTextDataset(list(first.values()), videos_dir, clip_settings_for(model, num_frames), text="none")
    parts, keys, skipped = [], [], 0
    for batch, n_bad in _loader(ds, Collator(None), s):
        skipped += n_bad
        if batch is None:
            continue
        f = model.video_features(batch["frames"].to(s.device),
                                 None if batch["frame_mask"] is None else batch["frame_mask"].to(s.device))
        parts.append(f.to("cpu") if keep_tokens else f.embeddings_only().to("cpu"))
        keys.extend(batch["clip_keys"])
    if not parts:
        from evl.errors import NoDecodableClips

        example = next(iter(first.values())).video
        raise NoDecodableClips(f"none of the {len(first)} clip(s) could be decoded (e.g. {example}; the warnings "
                               "above say why); run `evl data check` on the annotation or files they come from")
    features = VideoFeatures.cat(parts)
    return ClipEmbeddings(keys, features.emb.float(), features if keep_tokens else None, skipped)


@torch.no_grad()
def embed_texts(model: VideoLanguageModel, texts: list[str], tokenizer, settings: EvalSettings | None = None,
                keep_tokens: bool = False) -> TextFeatures:
    """Dual-encoder text features of `texts` in batches (CPU); tokens only when `keep_tokens`."""
    s = _resolve(settings or EvalSettings())
    parts = []
    for i in range(0, len(texts), s.batch_size):
        tok = tokenizer(texts[i:i + s.batch_size], max_length=s.max_text_len)
        f = model.text_features(tok.input_ids.to(s.device), tok.attention_mask.to(s.device))
        parts.append(f.to("cpu") if keep_tokens else f.embeddings_only().to("cpu"))
    return TextFeatures.cat(parts)


@torch.no_grad()
def evaluate_retrieval(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None,
                       tokenizer, settings: EvalSettings | None = None, num_frames: int | None = None) -> dict:
    """Text→video / video→text recall of the dual encoder, and t2v after fusion re-ranking of the top-k."""
    s = _resolve(settings or EvalSettings())
    by_video: dict[str, list[str]] = {}
    for r in records:
        by_video.setdefault(clip_key(r), []).extend(r.captions)
    # token-level features are kept (on the CPU) only when re-ranking needs them; otherwise just the
    # embeddings, so a 100k-clip gallery costs 100k × embed_dim floats
    rerank = min(s.rerank_k, len(by_video)) > 0 and model.has_fusion
    gallery = embed_clips(model, records, videos_dir, s, num_frames, keep_tokens=rerank)
    captions, text_to_video = [], []
    for vi, name in enumerate(gallery.keys):
        for c in by_video[name]:
            captions.append(c)
            text_to_video.append(vi)
    if not captions:
        raise ValueError("the retrieval set has no captions")
    text = embed_texts(model, captions, tokenizer, s, keep_tokens=rerank)
    t2v = torch.tensor(text_to_video)
    n = len(gallery.keys)
    out = retrieval_metrics(text.emb.float(), gallery.emb, t2v, ties="pessimistic")
    out.update(num_videos=n, num_captions=len(captions), undecodable=gallery.undecodable,
               chance_r1=chance_recall(n, 1), chance_r5=chance_recall(n, 5), chance_r10=chance_recall(n, 10))
    if rerank:
        out.update(_rerank(model, gallery.features, text, t2v, min(s.rerank_k, n), s.batch_size, s.device))
    return out


def _rerank(model: VideoLanguageModel, video: VideoFeatures, text: TextFeatures, t2v: torch.Tensor, k: int,
            batch_size: int, device: str) -> dict:
    """Fusion re-ranking of each caption's dual top-k, two ways: by the matching log-odds alone
    (`rerank_*`) and by dual logit + matching log-odds (`ensemble_*`, EgoVLPv2's multiple-choice rule).
    The fusion encoder scores each of the Nt·k shortlisted pairs once; both rankings reuse the scores.
    Features live on the CPU; each chunk of pairs is moved to `device` to be scored."""
    dual_top, top = similarity_topk(text.emb, video.emb, k)
    flat_t = torch.arange(top.shape[0]).repeat_interleave(k)
    flat_v = top.reshape(-1)
    log_odds = []
    chunk = batch_size * 4
    for i in range(0, flat_t.numel(), chunk):
        logits = model.score_pairs(video.select(flat_v[i:i + chunk]).to(device),
                                   text.select(flat_t[i:i + chunk]).to(device))
        log_odds.append((logits[:, 1] - logits[:, 0]).float().cpu())
    fused = torch.cat(log_odds).view(-1, k)
    ensemble = fused + dual_top.float() * model.logit_scale().float().cpu()
    out = {}
    for prefix, table in (("rerank", fused), ("ensemble", ensemble)):

        def score_fn(ti: torch.Tensor, vi: torch.Tensor, table=table) -> torch.Tensor:
            # look the pair's precomputed score up: its column is where `vi` sits in text ti's top-k
            cols = (top[ti] == vi[:, None]).float().argmax(dim=1)
            return table[ti, cols]

        metrics = rerank_t2v(top, score_fn, t2v, batch_size=chunk, ties="pessimistic")
        out.update({f"{prefix}_{key}": v for key, v in metrics.items()})
    return out


class AnswerTally:
    """The predictions of a QA or multiple-choice evaluation, gathered batch by batch, and their metrics:
    the one tally behind `evaluate_qa`, `evaluate_mc` and VLAP's evaluation from cached features.
    QA: the arg-max answer of each question against its gold answer, overall and per question type
    (`missing_type` for a question without one); MC: the arg-max option against the right one."""

    def __init__(self, task: str, vocab: AnswerVocab | None = None, missing_type: str = "all"):
        if task not in ("qa", "mc"):
            raise ValueError(f"task must be 'qa' or 'mc', got {task!r}")
        self.task, self.vocab, self.missing_type = task, vocab, missing_type
        self.preds: list[str] = []
        self.gold: list[str] = []
        self.types: list[str] = []
        self.right: list[bool] = []
        self.options = 0

    def add(self, scores: torch.Tensor, batch: dict) -> None:
        """(B, answers) logits (QA) or (B, K) option scores (MC) of one batch."""
        if self.task == "mc":
            self.options = scores.shape[1]
            self.right.extend((scores.argmax(dim=1) == batch["answer_index"]).tolist())
            return
        self.preds.extend(self.vocab.decode(i) for i in scores.argmax(dim=-1).tolist())
        self.gold.extend(batch["answers"])
        self.types.extend(t or self.missing_type for t in batch["qtypes"])

    def __len__(self) -> int:
        return len(self.right) if self.task == "mc" else len(self.preds)

    def metrics(self, train_records: list[Record] | None = None) -> dict:
        if self.task == "mc":
            return {"accuracy": 100.0 * sum(self.right) / len(self.right), "count": len(self.right),
                    "chance": 100.0 / self.options}
        out = qa_accuracy(self.preds, self.gold, self.types)
        if train_records:
            out["baseline"] = majority_baseline([r.answer for r in train_records], self.gold, self.types,
                                                train_types=[r.qtype or self.missing_type for r in train_records])
        return out


def _answer_scores(model: VideoLanguageModel, batch: dict, task: str) -> torch.Tensor:
    """QA: answer logits of (clip, question); MC: each option's dual + fusion score."""
    video = model.video_features(batch["frames"], batch.get("frame_mask"))
    if task == "mc":
        return model.option_scores(video, batch["option_ids"], batch["option_mask"])
    return model.answer(video, model.text_features(batch["input_ids"], batch["attention_mask"]))


def _tally(model: VideoLanguageModel, records: list[Record], videos_dir, tokenizer, settings: EvalSettings | None,
           num_frames: int | None, task: str, vocab: AnswerVocab | None = None) -> tuple[AnswerTally, int]:
    """Every decodable question of `records` answered → (the tally, undecodable clips skipped)."""
    s = _resolve(settings or EvalSettings())
    model.eval().to(s.device)
    ds = VideoTextDataset(records, videos_dir, clip_settings_for(model, num_frames),
                          text="question" if task == "qa" else "none")
    tally, skipped = AnswerTally(task, vocab), 0
    for batch, n_bad in _loader(ds, Collator(tokenizer, s.max_text_len), s):
        skipped += n_bad
        if batch is not None:
            batch = _to(batch, s.device)
            tally.add(_answer_scores(model, batch, task), batch)
    if not len(tally):
        what = "QA set could be decoded; run `evl data check` on the annotation" if task == "qa" else \
            "multiple-choice set could be decoded"
        raise ValueError(f"no video of the {what}")
    return tally, skipped


@torch.no_grad()
def evaluate_qa(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None, tokenizer,
                vocab: AnswerVocab, settings: EvalSettings | None = None, train_records: list[Record] | None = None,
                num_frames: int | None = None) -> dict:
    """Open-ended QA accuracy overall and per question type (+ majority baselines from training answers)."""
    tally, skipped = _tally(model, records, videos_dir, tokenizer, settings, num_frames, "qa", vocab)
    return {**tally.metrics(train_records), "undecodable": skipped}


@torch.no_grad()
def evaluate_mc(model: VideoLanguageModel, records: list[Record], videos_dir: str | Path | None, tokenizer,
                settings: EvalSettings | None = None, num_frames: int | None = None) -> dict:
    """Multiple-choice accuracy: pick the option with the best dual+fusion score."""
    tally, skipped = _tally(model, records, videos_dir, tokenizer, settings, num_frames, "mc")
    return {**tally.metrics(), "undecodable": skipped}
