"""Recipes: one YAML file = model + data + objectives + optimisation. `run_recipe` trains and evaluates.

A recipe's `model:` is a packaged model config name (`tiny`), a path to a model YAML, or an inline
mapping. `key=value` overrides reach any field (`train.lr=1e-4`, `model.video.num_layers=2`); an unknown
key is an error naming the nearest valid one. `evl pretrain` and `evl finetune` both call `run_recipe`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evl.config import deep_merge, load_config, load_yaml, to_dict
from evl.data.annotations import read_annotations
from evl.data.answers import ANSWERS_FILE
from evl.data.check import preflight_videos
from evl.data.datasets import ClipSettings, Collator, DataConfig, VideoTextDataset
from evl.data.shard_stream import ShardStream, is_shard_source
from evl.errors import ConfigError
from evl.losses.registry import parse_objectives
from evl.models.model import ModelConfig, VideoLanguageModel
from evl.tasks.evaluate import EvalSettings
from evl.tasks.registry import get_task
from evl.train.objective import TrainObjective
from evl.train.state import FINAL_DIR, check_out_dir
from evl.train.trainer import SKIP_WARN_RATE, Callback, TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class RecipeConfig:
    """`objectives`: loss term → weight (or {weight, options}); None = the task's default terms."""

    task: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: dict[str, Any] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        get_task(self.task)   # an unknown task is an error now, not after the data is read
        if self.objectives is not None:   # likewise an unknown term or a bad (negative, inf, nan) weight
            parse_objectives(self.objectives)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """YAML recipe (file or packaged name) + overrides → RecipeConfig, with `model: name` expanded;
    `objectives={vtc: 1, egonce: 1}` names the whole list of terms (it replaces the recipe's)."""
    return load_config(RecipeConfig, path, overrides, "recipes", expand=_expand_model, whole=("objectives",),
                       where="recipe")


def _expand_model(data: dict) -> dict:
    """`model: tiny` or `model: {name: tiny, ...}` → the packaged model config's mapping (+ the rest)."""
    model = data.get("model", {})
    if isinstance(model, str):
        data["model"] = load_yaml(model, "models")
    elif isinstance(model, dict) and isinstance(model.get("name"), str):
        rest = {k: v for k, v in model.items() if k != "name"}
        data["model"] = deep_merge(load_yaml(model["name"], "models"), rest)
    return data


def objectives_of(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe's loss terms, or its task's default ones."""
    return cfg.objectives if cfg.objectives is not None else dict(get_task(cfg.task).objectives)


def run_recipe(cfg: RecipeConfig, init: str | Path | None = None, resume: bool = False,
               evaluate: bool = True) -> dict:
    """Train per the recipe, save `out_dir/final` (model + config + answer vocab), evaluate on test.

    `init`: a checkpoint folder (saved by evl) to start from; its architecture wins over the recipe's
    `model:` section, and a QA head is created fresh when the task needs one. Runs through the one run
    function (`evl.train.run.run_job`): under torchrun rank 0 alone saves and evaluates the final model.
    """
    from evl.train.run import run_job

    return run_job(cfg.train, lambda ctx: _job(cfg, init, resume, evaluate, ctx), resume)


def _training_data(cfg: RecipeConfig, clip: ClipSettings, task, ctx):
    """The training set: an annotation file and its videos (map-style, records in memory), or tar shards
    streamed by rank and loader worker (`evl.data.shard_stream`), checked before the first step."""
    if is_shard_source(cfg.data.train):
        micro = cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)
        stream = ShardStream(cfg.data.train, clip, task.text, world_size=ctx.world_size, rank=ctx.rank,
                             workers=cfg.train.num_workers, micro_batch=max(1, micro),
                             grad_accum=cfg.train.grad_accum, shuffle_buffer=cfg.data.shuffle_buffer)
        task.check_records(stream.head_records(), cfg.data.train)   # the first samples' records
        return stream
    train_ds = VideoTextDataset.from_file(cfg.data.train, cfg.data.videos, clip, task.text, cfg.data.format,
                                          replace_bad=8, split=cfg.data.split)
    task.check_records(train_ds.records, cfg.data.train)
    missing = preflight_videos(train_ds.records, train_ds.videos_dir, f"data.train={cfg.data.train}")
    if missing > SKIP_WARN_RATE and ctx.is_main:
        log.warning("WARNING: %.0f%% of the training videos checked are missing under %s; the run trains on the "
                    "rest. Run `evl data check %s` to list them.", 100 * missing, train_ds.videos_dir, cfg.data.train)
    return train_ds


def _job(cfg: RecipeConfig, init: str | Path | None, resume: bool, evaluate: bool, ctx):
    import torch

    from evl.data.answers import AnswerVocab
    from evl.data.text import tokenizer_for, tokenizer_name
    from evl.train.run import Job

    if not cfg.data.train:
        raise ConfigError("data.train is empty: set it to an annotation file (e.g. data.train=runs/x/annotations/pretrain.json)")
    task = get_task(cfg.task)
    out_dir = Path(cfg.train.out_dir)
    # seed before building: every rank (and a 1-process run) starts from the same initial weights,
    # and a run is reproducible from its recipe alone
    torch.manual_seed(cfg.train.seed)
    if init is not None:
        model = VideoLanguageModel.from_pretrained(init)
        ignored = _model_differences(cfg.model, model.cfg)
        if ignored and ctx.is_main:
            log.warning("--init %s: the architecture comes from the checkpoint; the recipe's model settings %s "
                        "differ and are ignored", init, ", ".join(ignored[:8]))
        cfg.model = model.cfg
    else:
        model = VideoLanguageModel(cfg.model)
    tokenizer = tokenizer_for(model.cfg, init)
    # recorded in every checkpoint's config, and tokenizer.json copied beside each one
    model.cfg.text.tokenizer = tokenizer_name(tokenizer)
    positions = model.cfg.text.max_position_embeddings
    for key, length in (("data.max_text_len", cfg.data.max_text_len), ("eval.max_text_len", cfg.eval.max_text_len)):
        if not 3 <= length <= positions:
            raise ConfigError(f"{key}={length}: texts are cut to this many tokens, which must be in [3, {positions}] "
                              f"(the text tower has {positions} positions); lower {key}")
    num_frames = cfg.data.num_frames if cfg.data.num_frames is not None else model.cfg.video.num_frames
    if num_frames < 1 or num_frames % model.cfg.video.tubelet_size:
        raise ConfigError(f"data.num_frames={num_frames} must be a positive multiple of the model's "
                          f"video.tubelet_size={model.cfg.video.tubelet_size}")
    clip = ClipSettings(num_frames=num_frames, size=model.cfg.video.image_size, train=True, backend=cfg.data.backend,
                        cache_mb=cfg.data.frame_cache_mb)
    train_ds = _training_data(cfg, clip, task, ctx)
    vocab = None
    if task.uses_answer_vocab:
        vocab = AnswerVocab.build(r.answer for r in train_ds.records if r.answer is not None)
        model.set_num_answers(len(vocab))
        check_out_dir(out_dir, resume, cfg.train.overwrite)   # before writing: an old run's vocab stays
        if ctx.is_main:   # beside the run, so intermediate checkpoints can be evaluated too
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / ANSWERS_FILE).write_text(vocab.to_json())
    objective = TrainObjective.from_spec(model, objectives_of(cfg), tokenizer)

    def save(folder: Path, result, summary: dict) -> None:
        final = model
        if cfg.train.strategy == "fsdp":   # the in-memory model is sharded; the last checkpoint is whole
            final = VideoLanguageModel.from_pretrained(result.checkpoint_dir)
        final.save_pretrained(folder, vocab)
        shutil.copyfile(tokenizer.source / "tokenizer.json", folder / "tokenizer.json")

    def test() -> dict:
        saved = VideoLanguageModel.from_pretrained(out_dir / FINAL_DIR) if cfg.train.strategy == "fsdp" else model
        return evaluate_checkpoint_model(saved, cfg.task, cfg.data.test, cfg.data.videos, tokenizer, cfg.eval,
                                         vocab=vocab, fmt=cfg.data.format, train_records=train_ds.records,
                                         num_frames=num_frames, split=cfg.data.test_split)

    return Job(objective=objective, dataset=train_ds,
               collate=Collator(tokenizer, cfg.data.max_text_len, answer_vocab=vocab,
                                transforms=objective.batch_transforms()),
               model_config={"model": to_dict(model.cfg), "recipe": to_dict(cfg)}, save=save,
               summary={"task": cfg.task, "objectives": objective.weights},
               evaluate=test if evaluate and cfg.data.test else None,
               callbacks=[_CopyTokenizer(tokenizer.source)])


class _CopyTokenizer(Callback):
    """Put tokenizer.json into every checkpoint before it is committed (so before latest.json points at
    it): any step_* evaluates with the run's tokenizer, even one a kill left as the latest."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / "tokenizer.json"

    def on_checkpoint_staged(self, trainer: Trainer, staged: Path) -> None:
        shutil.copyfile(self.file, staged / "tokenizer.json")


def _model_differences(recipe: ModelConfig, checkpoint: ModelConfig) -> list[str]:
    """Dotted keys whose values differ between two model configs (weights source and QA size aside)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(to_dict(recipe)), flat(to_dict(checkpoint))
    skip = {"text.pretrained", "text.tokenizer", "num_answers"}
    return sorted(k for k in a.keys() | b.keys() if k not in skip and a.get(k) != b.get(k))


def evaluate_checkpoint_model(model: VideoLanguageModel, task: str, annotation: str | Path,
                              videos: str | Path | None, tokenizer, settings: EvalSettings, vocab=None,
                              fmt: str | None = None, train_records=None, num_frames: int | None = None,
                              split: str | None = None) -> dict:
    """Evaluate `model` on an annotation file for `task` (pretrain/retrieval → retrieval, qa, mc)."""
    from evl.data.check import guess_videos_dir

    spec = get_task(task)
    records = read_annotations(annotation, fmt, split=split)
    spec.check_records(records, str(annotation))
    videos = videos if videos is not None else guess_videos_dir(annotation, records)
    return spec.evaluate(model, records, videos, tokenizer, settings,
                         {"vocab": vocab, "train_records": train_records, "num_frames": num_frames})
