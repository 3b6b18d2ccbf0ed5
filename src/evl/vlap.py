"""`evl vlap train RECIPE`: VLAP — frame-level QA that reads k of N frames — and its baselines.

A VLAP recipe (`configs/vlap/*.yaml`) trains a `FrameQAModel` (`evl.models.frame_qa`) whose video
and text towers come from an evl checkpoint (`backbone`) or from another frame-QA checkpoint (`init`),
frozen either way. The pipeline, one recipe per stage:

1. `vlap-teacher-tiny`: select all N candidate frames; trains the QFormer and the answerer.
2. `vlap-tiny`: `init` and `teacher` = the teacher's final/; the Frame-Prompter picks one frame per
   segment (Gumbel-softmax, straight-through) and the student — initialised from the teacher —
   reads only those k; loss = answer cross-entropy + `distill`·MSE(TokenMap(student queries),
   teacher queries on all N) (VLAP's QFormer-Distiller, λ = 0.01 by default).
   Baselines from the same recipe: `model.select=uniform`, `model.question_aware=false`, `distill=0`,
   and `model.select=localizer` (SeViLA-style: a localizer trained on the teacher's pseudo-labels —
   a frame is positive when the teacher answers correctly from it alone — keeps its top k, and the
   student learns to answer from them).

Because the towers are frozen, their outputs for the N uniformly sampled candidates of every clip are
extracted once (`extract_features`, cached on disk under `feature_cache`, keyed by the towers' weights,
the clips and N) and training reads those: the usual practice of video-QA work with frozen
encoders. Inference (`evl ask`, the latency benchmark) runs from frames, where only the picked frames
go through the tower's blocks; a test checks that both paths give the same answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from evl.checkpoint import staged_dir
from evl.config import deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from evl.data.datasets import ClipSettings, Collator, VideoTextDataset, clip_key, record_text
from evl.errors import ConfigError
from evl.losses.functional import distill_loss, mc_loss, qa_loss
from evl.models.frame_prompter import Selection, temperature_at
from evl.models.frame_qa import FrameQAConfig, FrameQAModel
from evl.models.qformer import TokenMap
from evl.recipes import DataConfig
from evl.train.state import FINAL_DIR, SUMMARY_FILE, check_out_dir
from evl.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class VLAPRecipe:
    model: FrameQAConfig = field(default_factory=FrameQAConfig)
    backbone: str | None = None        # evl checkpoint whose towers the model reads (frozen)
    init: str | None = None            # frame-QA checkpoint to start from (its towers, QFormer, answerer)
    teacher: str | None = None         # frame-QA checkpoint on all N frames: the distillation target
    distill: float = 0.0               # λ of the QFormer-Distiller (needs a teacher; VLAP: 0.01)
    task: Literal["qa", "mc"] = "qa"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    feature_cache: str | None = None   # folder for extracted tower features (default: out_dir/features)
    batch_size_eval: int = 64


def load_vlap_recipe(path: str | Path | None, overrides: list[str] | None = None) -> VLAPRecipe:
    """YAML (file or packaged name in configs/vlap/) + `key=value` overrides."""
    data = load_yaml(path, "vlap") if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    recipe = from_dict(VLAPRecipe, data, where=str(path) if path is not None else "vlap recipe")
    if not recipe.backbone and not recipe.init:
        raise ConfigError("a VLAP recipe needs backbone= (an evl checkpoint, e.g. runs/pretrain-tiny/final) or "
                          "init= (a frame-QA checkpoint, e.g. the teacher's runs/vlap-teacher-tiny/final)")
    if recipe.distill < 0:
        raise ConfigError(f"distill must be >= 0, got {recipe.distill}")
    if recipe.batch_size_eval < 1:
        raise ConfigError(f"batch_size_eval={recipe.batch_size_eval}: must be >= 1 (questions per evaluation batch)")
    if recipe.distill > 0 and not recipe.teacher:
        raise ConfigError(f"distill={recipe.distill} needs teacher= (the all-frames model to distil from); "
                          "set teacher=runs/vlap-teacher-tiny/final or distill=0")
    if recipe.model.select == "localizer" and recipe.task != "qa":
        raise ConfigError("select=localizer learns from pseudo-labels of open-ended QA (task=qa); "
                          f"got task={recipe.task}")
    if recipe.model.select == "localizer" and not recipe.teacher:
        raise ConfigError("select=localizer needs teacher= (the all-frames model gives its pseudo-labels)")
    return recipe


# ------------------------------------------------------------------------------------------ features


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


# ------------------------------------------------------------------------------------------ training


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


@torch.no_grad()
def pseudo_labels(teacher: FrameQAModel, batch: dict) -> torch.Tensor:
    """(B, N) 1.0 where the teacher answers correctly from that candidate frame alone (SeViLA's labels)."""
    tokens, fm = batch["tokens"], batch["frame_mask"]
    b, n = fm.shape
    sel = Selection(torch.arange(n, device=fm.device).repeat(b)[:, None], fm.reshape(-1, 1))
    q = teacher.question_features(batch["input_ids"], batch["attention_mask"])
    out = teacher.read(tokens.flatten(0, 1)[:, None], sel, q.repeat_interleave(n, dim=0),
                       batch["attention_mask"].repeat_interleave(n, dim=0))
    right = out.logits.argmax(dim=1).view(b, n) == batch["answer_ids"][:, None]
    return (right & fm).float()


class VLAPObjective(nn.Module):
    """The student (or teacher) model; with a teacher, the frozen teacher and the distillation map
    (auxiliary modules), and for the localizer its pseudo-label loss."""

    def __init__(self, model: FrameQAModel, task: str, teacher: FrameQAModel | None, distill: float):
        super().__init__()
        self.model, self.task, self.distill = model, task, distill
        self.teacher = teacher
        cfg, m = model.cfg, model.cfg.qformer.num_queries
        self.distiller = (TokenMap(cfg.num_frames * m, cfg.num_candidates * m, cfg.qformer.hidden_size)
                          if teacher is not None and distill > 0 and model.localizer is None else None)
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        progress = float(batch.get("train_progress", 0.0))
        scores, out = answer(self.model, batch, self.task, progress)
        loss = mc_loss(scores, batch["answer_index"]) if self.task == "mc" else qa_loss(scores, batch["answer_ids"])
        losses = {"answer": loss}
        if self.distiller is not None:
            with torch.no_grad():
                _, target = answer(self.teacher, batch, self.task)
            m = self.model.cfg.qformer.num_queries
            student = out.queries * out.selection.mask.repeat_interleave(m, dim=1)[..., None]   # empty picks: 0
            real = batch["frame_mask"].repeat_interleave(m, dim=1)                               # teacher's real frames
            losses["distill"] = distill_loss(self.distiller(student), target.queries, mask=real)
            loss = loss + self.distill * losses["distill"]
        if self.model.localizer is not None:
            labels = pseudo_labels(self.teacher, batch)
            # its own loss trains the localizer only, not the answerer's question projection
            q = self.model.question_proj(self.model.question_features(batch["input_ids"], batch["attention_mask"])).detach()
            logits = self.model.localizer(batch["tokens"], q, batch["attention_mask"])
            fm = batch["frame_mask"].float() * (batch["answer_ids"] >= 0).float()[:, None]   # unknown answers: no label
            losses["localizer"] = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * fm).sum() / fm.sum()
            losses["positive_frames"] = labels.sum() / fm.sum()
            loss = loss + losses["localizer"]
        if self.model.prompter is not None:
            losses["temperature"] = torch.tensor(temperature_at(progress, self.model.cfg.tau_start, self.model.cfg.tau_end))
        return {"loss": loss, **{k: v.detach() for k, v in losses.items()}}


def _loss(module, batch):
    return module(batch)


def _check_same_towers(a: FrameQAModel, b: FrameQAModel, where: str) -> None:
    for name in ("video", "text"):
        if to_dict(getattr(a.cfg, name)) != to_dict(getattr(b.cfg, name)):
            raise ConfigError(f"{where} has other {name} tower settings than the model being trained: "
                              f"{to_dict(getattr(b.cfg, name))} vs {to_dict(getattr(a.cfg, name))}")
    if a.cfg.num_candidates != b.cfg.num_candidates:
        raise ConfigError(f"{where} reads num_candidates={b.cfg.num_candidates} frames but this model "
                          f"model.num_candidates={a.cfg.num_candidates}; they must match")
    if a.cfg.frame_input != b.cfg.frame_input:
        raise ConfigError(f"{where} reads model.frame_input={b.cfg.frame_input!r} but this model {a.cfg.frame_input!r}: "
                          "its features would mean something else; set model.frame_input to match")


def build_model(recipe: VLAPRecipe, num_answers: int) -> FrameQAModel:
    """From `init` (a frame-QA checkpoint: everything it has is copied) or `backbone` (an evl checkpoint)."""
    cfg = recipe.model
    cfg.num_answers = num_answers
    cfg.max_text_len = recipe.data.max_text_len
    if recipe.init:
        start = FrameQAModel.from_pretrained(_checkpoint(recipe.init, "init"))
        cfg.video, cfg.text, cfg.qformer = start.cfg.video, start.cfg.text, start.cfg.qformer
        model = FrameQAModel(cfg)
        _check_same_towers(model, start, f"init={recipe.init}")
        state = start.state_dict()
        missing = model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            log.info("init: not copied (the new model has no such part): %s", sorted(missing.unexpected_keys)[:5])
        if model.localizer is not None:   # SeViLA's localizer starts from the answerer's QFormer
            model.localizer.qformer.load_state_dict(start.qformer.state_dict())
        return model
    return FrameQAModel.from_backbone(recipe.backbone, cfg)


def _checkpoint(path: str, key: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}={path} is not a checkpoint folder (no config.json); pass the final/ folder "
                          "of an `evl vlap train` run")
    return path


def train_vlap(recipe: VLAPRecipe, resume: bool = False) -> dict[str, Any]:
    """Train per the recipe; save `out_dir/final` (the whole frame-QA model + answers.json); evaluate
    on `data.test` when given."""
    from evl.data.annotations import read_annotations
    from evl.data.text import tokenizer_for
    from evl.tasks.qa import AnswerVocab
    from evl.train.dist import init_distributed

    if not recipe.data.train:
        raise ConfigError("data.train is empty: set it to a QA (or multiple-choice) annotation file")
    ctx = init_distributed(recipe.train.device)
    try:
        # before anything is written (the feature cache goes under out_dir by default) or extracted
        check_out_dir(recipe.train.out_dir, resume, recipe.train.overwrite)
        if recipe.feature_cache:   # a file there would fail only after every clip was decoded
            try:
                Path(recipe.feature_cache).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"feature_cache={recipe.feature_cache} cannot be made a folder ({e.strerror or e}); "
                                  "name a folder for the extracted features, or leave it out (out_dir/features)") from None
        records = read_annotations(recipe.data.train, recipe.data.format, split=recipe.data.split)
        check_task(records, recipe.task, recipe.data.train)
        videos = videos_dir(recipe.data.videos, recipe.data.train, records)
        vocab = None
        if recipe.task == "qa":
            vocab = (FrameQAModel.read_vocab(recipe.init) if recipe.init else None) or \
                AnswerVocab.build(r.answer for r in records)
        teacher = FrameQAModel.from_pretrained(_checkpoint(recipe.teacher, "teacher")) if recipe.teacher else None
        torch.manual_seed(recipe.train.seed)
        model = build_model(recipe, len(vocab) if vocab is not None else 0)
        if teacher is not None:
            _check_same_towers(model, teacher, f"teacher={recipe.teacher}")
            if towers_fingerprint(teacher) != towers_fingerprint(model):
                raise ConfigError(f"teacher={recipe.teacher} has other tower weights than the model being trained "
                                  f"({recipe.init or recipe.backbone}): its outputs on this model's features mean nothing. "
                                  "Use a teacher trained on the same backbone (init=<teacher> does that)")
            t_vocab = FrameQAModel.read_vocab(recipe.teacher)
            if vocab is not None and (t_vocab is None or t_vocab.answers != vocab.answers):
                raise ConfigError(f"teacher={recipe.teacher} answers over another vocabulary than this run's; "
                                  "start from the teacher (init=<teacher>) so both use its answers.json")
            if teacher.cfg.select != "all":
                raise ConfigError(f"teacher={recipe.teacher} reads {teacher.cfg.num_frames} selected frames "
                                  f"(select={teacher.cfg.select}); the teacher must read all N (select=all)")
        tokenizer = tokenizer_for(model.cfg, recipe.init or recipe.backbone)
        out_dir = Path(recipe.train.out_dir)
        cache = Path(recipe.feature_cache) if recipe.feature_cache else out_dir / "features"
        text = "none" if recipe.task == "mc" else "question"
        feats = extract_features(model, records, videos, cache, recipe.data.backend)
        dataset = FeatureDataset(records, feats, text, train=True)
        collate = FeatureCollator(tokenizer, recipe.data.max_text_len, answer_vocab=vocab)
        objective = VLAPObjective(model, recipe.task, teacher, recipe.distill)
        trainer = Trainer(objective, _loss, dataset, recipe.train, collate_fn=collate,
                          model_config={"kind": "frame_qa_training", "recipe": to_dict(recipe)})
        result = trainer.fit(resume=resume)
        summary: dict[str, Any] = {"steps": result.steps, "final_losses": result.final_losses,
                                   "train_time_s": result.wall_time_s, "undecodable_clips": feats.bad}
        if not ctx.is_main:
            return summary
        final = out_dir / FINAL_DIR
        with staged_dir(final) as staged:   # final/ appears whole or not at all
            model.save_pretrained(staged, vocab, {"recipe": to_dict(recipe), "task": recipe.task})
            (staged / "tokenizer.json").write_bytes((Path(tokenizer.source) / "tokenizer.json").read_bytes())
        summary["checkpoint"] = str(final)
        if recipe.data.test:
            test = read_annotations(recipe.data.test, recipe.data.format, split=recipe.data.test_split)
            check_task(test, recipe.task, recipe.data.test)
            model.cpu()
            test_feats = extract_features(model, test, videos_dir(recipe.data.videos, recipe.data.test, test), cache,
                                          recipe.data.backend)
            summary["test"] = evaluate_features(model, test, test_feats, tokenizer, vocab, recipe.task,
                                                recipe.batch_size_eval, recipe.data.max_text_len)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        ctx.close()


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
    from evl.tasks.qa import qa_accuracy

    if task == "qa" and vocab is None:
        raise ConfigError("open-ended QA evaluation needs the checkpoint's answers.json (the model was not trained "
                          "on open-ended QA: evaluate it with task mc)")
    model.eval()
    dataset = FeatureDataset(records, feats, "none" if task == "mc" else "question", train=False)
    collate = FeatureCollator(tokenizer, max_text_len)
    preds, gold, types, right, picks = [], [], [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        scores, out = answer(model, batch, task)
        if task == "mc":
            right.extend((scores.argmax(dim=1) == batch["answer_index"]).tolist())
        else:
            preds.extend(vocab.decode(i) for i in scores.argmax(dim=1).tolist())
            gold.extend(batch["answers"])
            types.extend(batch["qtypes"])
            picks.extend([i for i, ok in zip(row, ok_row, strict=True) if ok] for row, ok_row
                         in zip(out.selection.index.tolist(), out.selection.mask.tolist(), strict=True))
    result: dict[str, Any] = {"count": len(dataset), "skipped_undecodable": len(records) - len(dataset)}
    if task == "mc":
        result["mc_accuracy"] = 100.0 * sum(right) / len(right)
    else:
        acc = qa_accuracy(preds, gold, [t or "unknown" for t in types])
        result.update(qa_accuracy=acc["accuracy"], per_type=acc["per_type"], count_per_type=acc["count_per_type"])
        result["distinct_frame_sets_per_clip"] = distinct_sets_per_clip(
            [clip_key(r) for r in dataset.records], picks)
        if keep_picks:
            result["picks"] = picks
            result["correct"] = [int(a == b) for a, b in zip(preds, gold, strict=True)]
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
