"""`evl vlap train RECIPE`: VLAP — frame-level QA that reads k of N frames — and its baselines.

A VLAP recipe (`configs/vlap/*.yaml`) trains a `FrameQAModel` (`evl.techniques.vlap.frame_qa`) whose video
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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from evl.config import load_config, to_dict
from evl.data.datasets import DataConfig
from evl.errors import ConfigError
from evl.losses.functional import distill_loss, mc_loss, qa_loss
from evl.models.selection import Selection
from evl.techniques.vlap.evaluate import check_task, evaluate_features, videos_dir
from evl.techniques.vlap.features import (
    FeatureCollator,
    FeatureDataset,
    answer,
    extract_features,
    towers_fingerprint,
)
from evl.techniques.vlap.frame_prompter import temperature_at
from evl.techniques.vlap.frame_qa import FrameQAConfig, FrameQAModel
from evl.techniques.vlap.qformer import TokenMap
from evl.train.objective import Objective
from evl.train.state import check_out_dir
from evl.train.trainer import TrainConfig

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

    def __post_init__(self) -> None:
        if not self.backbone and not self.init:
            raise ConfigError("a VLAP recipe needs backbone= (an evl checkpoint, e.g. runs/pretrain-tiny/final) or "
                              "init= (a frame-QA checkpoint, e.g. the teacher's runs/vlap-teacher-tiny/final)")
        if self.distill < 0:
            raise ConfigError(f"distill must be >= 0, got {self.distill}")
        if self.batch_size_eval < 1:
            raise ConfigError(f"batch_size_eval={self.batch_size_eval}: must be >= 1 (questions per evaluation batch)")
        if self.distill > 0 and not self.teacher:
            raise ConfigError(f"distill={self.distill} needs teacher= (the all-frames model to distil from); "
                              "set teacher=runs/vlap-teacher-tiny/final or distill=0")
        if self.model.select == "localizer" and self.task != "qa":
            raise ConfigError("select=localizer learns from pseudo-labels of open-ended QA (task=qa); "
                              f"got task={self.task}")
        if self.model.select == "localizer" and not self.teacher:
            raise ConfigError("select=localizer needs teacher= (the all-frames model gives its pseudo-labels)")


def load_vlap_recipe(path: str | Path | None, overrides: list[str] | None = None) -> VLAPRecipe:
    """YAML (file or packaged name in configs/vlap/) + `key=value` overrides."""
    return load_config(VLAPRecipe, path, overrides, "vlap", where="vlap recipe")


# ------------------------------------------------------------------------------------------ training


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


class VLAPObjective(Objective):
    """The student (or teacher) model; with a teacher, the frozen teacher and the distillation map
    (auxiliary modules), and for the localizer its pseudo-label loss."""

    frozen = ("teacher",)

    def __init__(self, model: FrameQAModel, task: str, teacher: FrameQAModel | None, distill: float):
        super().__init__()
        self.model, self.task, self.distill = model, task, distill
        self.teacher = self.freeze(teacher)
        cfg, m = model.cfg, model.cfg.qformer.num_queries
        self.distiller = (TokenMap(cfg.num_frames * m, cfg.num_candidates * m, cfg.qformer.hidden_size)
                          if teacher is not None and distill > 0 and model.localizer is None else None)

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


def build_frame_qa_model(recipe: VLAPRecipe, num_answers: int) -> FrameQAModel:
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
    """Train per the recipe through the one run function (`evl.train.run.run_job`); save `out_dir/final`
    (the whole frame-QA model + answers.json); evaluate on `data.test` when given."""
    from evl.train.run import run_job

    if not recipe.data.train:
        raise ConfigError("data.train is empty: set it to a QA (or multiple-choice) annotation file")
    return run_job(recipe.train, lambda ctx: _job(recipe, resume), resume)


def _job(recipe: VLAPRecipe, resume: bool):
    from evl.data.annotations import read_annotations
    from evl.data.answers import AnswerVocab
    from evl.data.text import tokenizer_for
    from evl.train.run import Job

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
    model = build_frame_qa_model(recipe, len(vocab) if vocab is not None else 0)
    if teacher is not None:
        _check_teacher(recipe, model, teacher, vocab)
    tokenizer = tokenizer_for(model.cfg, recipe.init or recipe.backbone)
    cache = Path(recipe.feature_cache) if recipe.feature_cache else Path(recipe.train.out_dir) / "features"
    text = "none" if recipe.task == "mc" else "question"
    feats = extract_features(model, records, videos, cache, recipe.data.backend)

    def save(folder: Path, result, summary: dict) -> None:
        model.save_pretrained(folder, vocab, {"recipe": to_dict(recipe), "task": recipe.task})
        (folder / "tokenizer.json").write_bytes((Path(tokenizer.source) / "tokenizer.json").read_bytes())

    def test() -> dict:
        records = read_annotations(recipe.data.test, recipe.data.format, split=recipe.data.test_split)
        check_task(records, recipe.task, recipe.data.test)
        model.cpu()
        test_feats = extract_features(model, records, videos_dir(recipe.data.videos, recipe.data.test, records),
                                      cache, recipe.data.backend)
        return evaluate_features(model, records, test_feats, tokenizer, vocab, recipe.task,
                                 recipe.batch_size_eval, recipe.data.max_text_len)

    return Job(objective=VLAPObjective(model, recipe.task, teacher, recipe.distill),
               dataset=FeatureDataset(records, feats, text, train=True),
               collate=FeatureCollator(tokenizer, recipe.data.max_text_len, answer_vocab=vocab),
               model_config={"kind": "frame_qa_training", "recipe": to_dict(recipe)}, save=save,
               summary={"undecodable_clips": feats.bad}, evaluate=test if recipe.data.test else None)


def _check_teacher(recipe: VLAPRecipe, model: FrameQAModel, teacher: FrameQAModel, vocab) -> None:
    """The teacher must read the same towers (settings and weights), answer over the same vocabulary
    and read all N frames: otherwise its outputs on this model's features mean nothing."""
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
