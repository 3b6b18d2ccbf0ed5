"""Recipes: one YAML file = model + data + objectives + optimisation. `run_recipe` trains and evaluates.

A recipe's `model:` is a packaged model config name (`tiny`), a path to a model YAML, or an inline
mapping. `key=value` overrides reach any field (`train.lr=1e-4`, `model.video.num_layers=2`); an unknown
key is an error naming the nearest valid one. `evl pretrain` and `evl finetune` both call `run_recipe`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from evl.config import deep_merge, from_dict, load_yaml, parse_overrides, to_dict
from evl.data.annotations import read_annotations
from evl.data.datasets import ClipSettings, Collator, VideoTextDataset
from evl.errors import ConfigError
from evl.models.model import ModelConfig, VideoLanguageModel
from evl.tasks.evaluate import EvalSettings, evaluate_mc, evaluate_qa, evaluate_retrieval
from evl.tasks.objective import ObjectiveWeights, TrainObjective
from evl.train import TrainConfig, Trainer

log = logging.getLogger(__name__)

Task = Literal["pretrain", "retrieval", "qa", "mc"]
ANSWERS_FILE = "answers.json"


@dataclass
class DataConfig:
    """Annotation files (any format `evl data formats` lists) and how clips/texts are read."""

    train: str = ""
    val: str | None = None
    test: str | None = None
    videos: str | None = None          # folder video paths are relative to (default: guessed per file)
    format: str | None = None
    num_frames: int | None = None      # default: the model's video.num_frames
    max_text_len: int = 32
    mlm_prob: float = 0.15
    backend: Literal["pyav", "decord"] = "pyav"


@dataclass
class RecipeConfig:
    task: Task = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """YAML recipe (file or packaged name) + overrides → RecipeConfig, with `model: name` expanded."""
    data = _expand_model(load_yaml(path) if path is not None else {})
    # expand `model: name` before *and* after merging, so `model.video.num_layers=2` refines the named
    # model and `model=small` replaces it
    data = _expand_model(deep_merge(data, parse_overrides(overrides or [])))
    return from_dict(RecipeConfig, data, where=str(path) if path is not None else "recipe")


def _expand_model(data: dict) -> dict:
    """`model: tiny` or `model: {name: tiny, ...}` → the packaged model config's mapping (+ the rest)."""
    model = data.get("model", {})
    if isinstance(model, str):
        data["model"] = load_yaml(model)
    elif isinstance(model, dict) and isinstance(model.get("name"), str):
        rest = {k: v for k, v in model.items() if k != "name"}
        data["model"] = deep_merge(load_yaml(model["name"]), rest)
    return data


def _text_mode(task: str) -> str:
    return {"pretrain": "caption", "retrieval": "caption", "qa": "question", "mc": "none"}[task]


def _weights_for(cfg: RecipeConfig) -> ObjectiveWeights:
    """The recipe's weights for pre-training/retrieval; QA and MC train their own head loss only."""
    if cfg.task == "qa":
        return ObjectiveWeights(vtc=0, vtm=0, mlm=0, qa=1)
    if cfg.task == "mc":
        return ObjectiveWeights(vtc=0, vtm=0, mlm=0, mc=1)
    return cfg.objectives


def _loss(module, batch):
    return module(batch)


def run_recipe(cfg: RecipeConfig, init: str | Path | None = None, resume: bool = False,
               evaluate: bool = True) -> dict:
    """Train per the recipe, save `out_dir/final` (model + config + answer vocab), evaluate on test.

    `init`: a checkpoint folder (saved by evl) to start from; its architecture wins over the recipe's
    `model:` section, and a QA head is created fresh when the task needs one. Under torchrun the
    process group is opened here (the Trainer reuses it), so that after training rank 0 alone saves
    and evaluates the final model.
    """
    from evl.train_dist import init_distributed

    ctx = init_distributed(cfg.train.device)
    try:
        return _run(cfg, init, resume, evaluate, ctx.is_main)
    finally:
        ctx.close()


def _check_task_records(task: str, records: list, path: str) -> None:
    """Fail before training when the annotation cannot serve the task (e.g. a QA file for retrieval)."""
    need = {"pretrain": ("captions", "a caption"), "retrieval": ("captions", "a caption"),
            "qa": ("question", "a question and an answer"), "mc": ("options", "answer options")}[task]
    bad = next((r for r in records if not getattr(r, need[0]) or (task == "qa" and r.answer is None)
                or (task == "mc" and r.answer_index is None)), None)
    if bad is not None:
        raise ConfigError(f"{bad.source or path}: task={task} needs {need[1]} in every record; this one has none "
                          f"(kind {bad.kind!r}). Use an annotation file of that task or set task=...")


def _run(cfg: RecipeConfig, init: str | Path | None, resume: bool, evaluate: bool, is_main: bool) -> dict:
    import torch

    from evl.data.text import Tokenizer
    from evl.tasks.qa import AnswerVocab

    if not cfg.data.train:
        raise ConfigError("data.train is empty: set it to an annotation file (e.g. data.train=runs/x/annotations/pretrain.json)")
    out_dir = Path(cfg.train.out_dir)
    tokenizer = Tokenizer.from_pretrained("minilm")
    # seed before building: every rank (and a 1-process run) starts from the same initial weights,
    # and a run is reproducible from its recipe alone
    torch.manual_seed(cfg.train.seed)
    if init is not None:
        model = VideoLanguageModel.from_pretrained(init)
        ignored = _model_differences(cfg.model, model.cfg)
        if ignored and is_main:
            log.warning("--init %s: the architecture comes from the checkpoint; the recipe's model settings %s "
                        "differ and are ignored", init, ", ".join(ignored[:8]))
        cfg.model = model.cfg
    else:
        model = VideoLanguageModel(cfg.model)
    if model.cfg.text.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.text.vocab_size={model.cfg.text.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, the packaged MiniLM/BERT-uncased vocab); "
                          f"set model.text.vocab_size={tokenizer.vocab_size}")
    num_frames = cfg.data.num_frames or model.cfg.video.num_frames
    if num_frames < 1 or num_frames % model.cfg.video.tubelet_size:
        raise ConfigError(f"data.num_frames={num_frames} must be a positive multiple of the model's "
                          f"video.tubelet_size={model.cfg.video.tubelet_size}")
    clip = ClipSettings(num_frames=num_frames, size=model.cfg.video.image_size, train=True, backend=cfg.data.backend)
    train_ds = VideoTextDataset.from_file(cfg.data.train, cfg.data.videos, clip, _text_mode(cfg.task), cfg.data.format,
                                          replace_bad=8)
    _check_task_records(cfg.task, train_ds.records, cfg.data.train)
    vocab = None
    if cfg.task == "qa":
        vocab = AnswerVocab.build(r.answer for r in train_ds.records if r.answer is not None)
        model.set_num_answers(len(vocab))
        if is_main:   # beside the run, so intermediate checkpoints can be evaluated too
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / ANSWERS_FILE).write_text(vocab.to_json())
    weights = _weights_for(cfg)
    mlm_prob = cfg.data.mlm_prob if weights.mlm else 0.0
    collate = Collator(tokenizer, cfg.data.max_text_len, mlm_prob=mlm_prob, answer_vocab=vocab)
    frozen = freeze_unused(model, weights)
    if frozen:
        log.info("objectives %s do not use %d parameter tensors; frozen for this run", weights, frozen)
    trainer = Trainer(TrainObjective(model, weights), _loss, train_ds, cfg.train, collate_fn=collate,
                      model_config={"model": to_dict(model.cfg), "recipe": to_dict(cfg)})
    result = trainer.fit(resume=resume)
    summary = {"task": cfg.task, "steps": result.steps, "final_losses": result.final_losses,
               "train_time_s": result.wall_time_s, "skipped_samples": result.skipped_samples,
               "nonfinite_steps": result.nonfinite_steps}
    if not is_main:
        return summary
    if cfg.train.strategy == "fsdp":   # the in-memory model is sharded; the last checkpoint is whole
        model = VideoLanguageModel.from_pretrained(result.checkpoint_dir)
    final = out_dir / "final"
    model.save_pretrained(final)
    if vocab is not None:
        (final / ANSWERS_FILE).write_text(vocab.to_json())
    summary["checkpoint"] = str(final)
    if evaluate and cfg.data.test:
        summary["test"] = evaluate_checkpoint_model(model, cfg.task, cfg.data.test, cfg.data.videos, tokenizer,
                                                    cfg.eval, vocab=vocab, fmt=cfg.data.format,
                                                    train_records=train_ds.records, num_frames=num_frames)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _model_differences(recipe: ModelConfig, checkpoint: ModelConfig) -> list[str]:
    """Dotted keys whose values differ between two model configs (weights source and QA size aside)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(to_dict(recipe)), flat(to_dict(checkpoint))
    skip = {"text.pretrained", "num_answers"}
    return sorted(k for k in a.keys() | b.keys() if k not in skip and a.get(k) != b.get(k))


def find_answer_vocab(checkpoint: str | Path) -> Path | None:
    """answers.json beside a checkpoint: in `final/`, or in the run folder of `checkpoints/step_*`."""
    ckpt = Path(checkpoint)
    for folder in (ckpt, ckpt.parent.parent):
        if (folder / ANSWERS_FILE).is_file():
            return folder / ANSWERS_FILE
    return None


def unused_parameter(name: str, w: ObjectiveWeights, model_cfg: ModelConfig | None = None) -> bool:
    """True when no enabled objective sends a gradient to parameter `name`.

    DDP waits for a gradient for every trainable parameter; one that never gets one (e.g. the MLM head
    in retrieval fine-tuning) stalls the reduction, so such parameters are frozen instead.
    """
    fusion = w.vtm or w.mlm or w.qa or w.mc
    video_output_used = w.vtc or w.egonce or w.vtm or w.qa or w.mc
    if model_cfg is not None and model_cfg.fusion.kind == "backbone" and not video_output_used:
        # MLM alone reads only the fused *text* tokens: the last video block's output (and the final
        # norm) feed nothing, since each text layer attends to the video state *before* that block
        last = f"video.blocks.{model_cfg.video.num_layers - 1}."
        if name.startswith((last, "video.norm.")):
            return True
    if name.startswith("cross.") or ".cross." in name or ".xattn." in name:
        return not fusion
    if name.startswith("mlm_head."):
        return not w.mlm
    if name.startswith("vtm_head."):
        return not (w.vtm or w.mc)
    if name.startswith("qa_head."):
        return not w.qa
    if name.startswith(("video_proj.", "text_proj.", "logit_scale.")):
        return not (w.vtc or w.egonce or w.mc)
    return False


def freeze_unused(model: VideoLanguageModel, w: ObjectiveWeights) -> int:
    """Set requires_grad=False on the parameters the objectives do not train; returns how many."""
    n = 0
    for name, p in model.named_parameters():
        if unused_parameter(name, w, model.cfg):
            p.requires_grad_(False)
            n += 1
    return n


def evaluate_checkpoint_model(model: VideoLanguageModel, task: str, annotation: str | Path,
                              videos: str | Path | None, tokenizer, settings: EvalSettings, vocab=None,
                              fmt: str | None = None, train_records=None, num_frames: int | None = None) -> dict:
    """Run the evaluation of `task` ("retrieval"/"pretrain" → retrieval, "qa", "mc") on an annotation file."""
    from evl.data.check import guess_videos_dir

    if task not in ("retrieval", "pretrain", "qa", "mc"):
        raise ConfigError(f"unknown task {task!r}; expected retrieval, qa or mc")
    records = read_annotations(annotation, fmt)
    _check_task_records(task, records, str(annotation))
    videos = videos if videos is not None else guess_videos_dir(annotation, records)
    if task in ("retrieval", "pretrain"):
        return evaluate_retrieval(model, records, videos, tokenizer, settings, num_frames)
    if task == "qa":
        if vocab is None:
            raise ConfigError("QA evaluation needs the answer vocabulary saved beside the checkpoint (answers.json)")
        return evaluate_qa(model, records, videos, tokenizer, vocab, settings, train_records, num_frames)
    if task == "mc":
        return evaluate_mc(model, records, videos, tokenizer, settings, num_frames)
    raise ConfigError(f"unknown task {task!r}; expected retrieval, qa or mc")
