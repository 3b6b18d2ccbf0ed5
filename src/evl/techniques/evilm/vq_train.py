"""`evl vq train RECIPE`: train the VQ video tokenizer whose codes are E-ViLM's MVM targets.

A tokenizer recipe (`configs/tokenizers/*.yaml`) holds the tokenizer's shape, the teacher, the data
(videos only: any annotation file) and the optimisation. `tokenizer.target: semantic` reconstructs the
features of `teacher` — the video tower of an evl checkpoint, frozen (the default teacher is a model
pre-trained with VTC, whose features are aligned with text); `pixel` reconstructs normalised pixels
(the VQ-VAE variant). The Trainer runs it (checkpoints, `--resume`, torchrun); `final/` holds the
tokenizer's weights and config, with the codebook usage measured over the training clips at the end
(perplexity, fraction of codes used) in the config's metadata.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evl.config import load_config, load_yaml, to_dict
from evl.data.datasets import DataConfig
from evl.errors import ConfigError
from evl.models.masking import normalize_targets, patchify
from evl.models.video import VideoEncoder
from evl.techniques.evilm.vq_tokenizer import VQTokenizer, VQTokenizerConfig, check_same_tubelets
from evl.train.objective import Objective
from evl.train.trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class VQRecipe:
    tokenizer: VQTokenizerConfig = field(default_factory=VQTokenizerConfig)
    teacher: str | None = None        # evl checkpoint folder (semantic target): its video tower, frozen
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    usage_clips: int = 256            # clips encoded at the end to measure codebook usage (0: none)

    def __post_init__(self) -> None:
        if self.usage_clips < 0:
            raise ConfigError(f"usage_clips={self.usage_clips}: must be >= 0 (the clips encoded at the end to "
                              "measure codebook usage; 0 measures none)")


def load_vq_recipe(path: str | Path | None, overrides: list[str] | None = None) -> VQRecipe:
    """YAML (file or packaged name in configs/tokenizers/) + overrides. `tokenizer.video` may name a
    model config (`tiny`): the tokenizer then cuts clips exactly as that model does."""
    return load_config(VQRecipe, path, overrides, "tokenizers", expand=_expand_video, where="tokenizer recipe")


def _expand_video(data: dict) -> dict:
    tok = data.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("video"), str):
        tok["video"] = load_yaml(tok["video"], "models").get("video", {})
    return data


def load_teacher(path: str | None, recipe: VQRecipe) -> VideoEncoder | None:
    """The frozen video tower of an evl checkpoint, checked against the tokenizer's tubelets."""
    from evl.models.model import VideoLanguageModel

    cfg = recipe.tokenizer
    if cfg.target == "pixel":
        if path:
            raise ConfigError(f"teacher={path}: tokenizer.target=pixel reconstructs pixels and takes no teacher")
        return None
    if not path:
        raise ConfigError("tokenizer.target=semantic needs teacher: an evl checkpoint folder (e.g. the final/ of "
                          "`evl pretrain pretrain-tiny`) whose video tower gives the target features")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"teacher={path} is not an evl checkpoint folder (no config.json); pass e.g. "
                          "runs/pretrain-tiny/final")
    teacher = VideoLanguageModel.from_pretrained(path).video
    check_same_tubelets(cfg.video, teacher.cfg, f"teacher={path}", ("the tokenizer", "the teacher"))
    width = teacher.cfg.hidden_size
    if cfg.target_dim and cfg.target_dim != width:
        raise ConfigError(f"tokenizer.target_dim={cfg.target_dim} but the teacher {path} has features of width "
                          f"{width}; drop tokenizer.target_dim (it follows the teacher) or pick another teacher")
    cfg.target_dim = width
    return Objective.freeze(teacher)


class _TokenizerObjective(Objective):
    """What the Trainer trains: the tokenizer, with the frozen teacher that gives its targets."""

    frozen = ("teacher",)

    def __init__(self, tokenizer: VQTokenizer, teacher: VideoEncoder | None):
        super().__init__()
        self.tokenizer = tokenizer
        self.teacher = self.freeze(teacher)

    def targets(self, frames: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            video = self.tokenizer.cfg.video
            return normalize_targets(patchify(frames.float(), video.patch_size, video.tubelet_size), video.in_channels)
        with torch.no_grad():
            out = self.teacher(frames)
        return out.tokens[:, 1:] if self.teacher.cls_token is not None else out.tokens

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        frames = batch["frames"]
        out = self.tokenizer(frames, self.targets(frames))
        return {"loss": out.loss, "rec": out.reconstruction, "commit": out.commit,
                "perplexity": out.perplexity, "codes_used": out.used}


@torch.no_grad()
def codebook_usage(tokenizer: VQTokenizer, dataset, collate, clips: int, batch_size: int) -> dict[str, Any]:
    """Histogram of the codes over up to `clips` clips: perplexity, fraction and count of codes used."""
    tokenizer.eval()
    counts = torch.zeros(tokenizer.cfg.num_codes)
    seen = 0
    for start in range(0, min(clips, len(dataset)), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, clips, len(dataset)))]
        samples = [s for s in samples if s is not None]
        if not samples:
            continue
        codes = tokenizer.encode(collate(samples)["frames"])
        counts += torch.bincount(codes.flatten(), minlength=counts.numel()).float()
        seen += len(samples)
    p = counts / counts.sum().clamp_min(1)
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())) if seen else 0.0
    return {"clips": seen, "perplexity": round(perplexity, 2), "codes_used": int((counts > 0).sum()),
            "fraction_used": round(float((counts > 0).float().mean()), 4), "num_codes": counts.numel()}


def train_tokenizer(recipe: VQRecipe, resume: bool = False) -> dict[str, Any]:
    """Train per the recipe through the one run function (`evl.train.run.run_job`); save `out_dir/final`
    (tokenizer + config with the codebook usage in its metadata)."""
    from evl.train.run import run_job

    if not recipe.data.train:
        raise ConfigError("data.train is empty: set it to an annotation file whose videos the tokenizer learns from")
    return run_job(recipe.train, lambda ctx: _job(recipe), resume)


def _job(recipe: VQRecipe):
    from evl.data.datasets import ClipSettings, Collator, VideoTextDataset
    from evl.train.run import Job

    teacher = load_teacher(recipe.teacher, recipe)
    cfg = recipe.tokenizer
    if cfg.target == "pixel":
        v = cfg.video
        cfg.target_dim = v.tubelet_size * v.patch_size ** 2 * v.in_channels
    torch.manual_seed(recipe.train.seed)
    tokenizer = VQTokenizer(cfg)
    clip = ClipSettings(num_frames=cfg.video.num_frames, size=cfg.video.image_size, train=True,
                        backend=recipe.data.backend, cache_mb=recipe.data.frame_cache_mb)
    data = VideoTextDataset.from_file(recipe.data.train, recipe.data.videos, clip, "none", recipe.data.format,
                                      replace_bad=8, split=recipe.data.split)
    collate = Collator(None)

    def usage(result, summary: dict) -> None:
        summary["usage"] = codebook_usage(tokenizer, _eval_view(data, clip), collate, recipe.usage_clips,
                                          recipe.train.batch_size)

    def save(folder: Path, result, summary: dict) -> None:
        tokenizer.save_pretrained(folder, metadata={**summary, "recipe": to_dict(recipe)})

    return Job(objective=_TokenizerObjective(tokenizer, teacher), dataset=data, collate=collate,
               model_config={"kind": "vq_tokenizer_training", "recipe": to_dict(recipe)}, save=save,
               summary={"target": cfg.target, "teacher": recipe.teacher}, finish=usage)


def _eval_view(data, clip):
    """The same records, decoded for evaluation (uniform frames, no augmentation)."""
    from evl.data.datasets import VideoTextDataset

    return VideoTextDataset(data.records, data.videos_dir, dataclasses.replace(clip, train=False), "none")
