"""`VideoLanguageModel`: the towers, the fusion, and the heads, composed from one typed config.

Dual path (retrieval):  encode_video / encode_text → L2-normalised embeddings, cosine similarity.
Fusion path (matching, MLM, QA): `fuse` runs the cross-modal part on chosen (video, text) pairs.

With backbone fusion (EgoVLPv2) the lower tower layers are shared by both paths: `video_features` /
`text_features` keep the hidden states entering the fused layers (`lower`), and `fuse` restarts from
there, so a pre-training step pays for the lower layers once, not once per pass.

The fusion kind is a module from `evl.models.fusion.FUSIONS` (`self.fusion`, None for a dual-only
model); the model never branches on the kind's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import MAX_COUNT, MAX_WIDTH, check_range, from_dict
from evl.errors import ConfigError
from evl.models.features import FusionOutput, TextFeatures, VideoFeatures
from evl.models.fusion import FUSIONS, FusionConfig
from evl.models.layers import LogitScale
from evl.models.saved import SavedModel
from evl.models.text import TextEncoder, TextEncoderConfig, masked_mean
from evl.models.video import VideoEncoder, VideoEncoderConfig

__all__ = ["FusionOutput", "ModelConfig", "TextFeatures", "VideoFeatures", "VideoLanguageModel", "build_model"]

# the `kind` other model checkpoints record in their config.json (a video-language model records none),
# so that passing one where a video-language model is expected says what it is, not `unknown key 'qformer'`


@dataclass
class ModelConfig:
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 256          # shared space of the dual encoder
    num_answers: int = 0          # open-ended QA head size; 0 = no QA head (fine-tuning sets it)

    def __post_init__(self) -> None:
        check_range("model.embed_dim", self.embed_dim, 1, MAX_WIDTH)
        check_range("model.num_answers", self.num_answers, 0, MAX_COUNT, " answer classes (0 = no QA head)")
        if self.fusion.kind == "encoder" and self.text.hidden_size % self.fusion.num_heads:
            raise ConfigError(f"fusion.num_heads={self.fusion.num_heads} does not divide the fusion encoder's width "
                              f"(text.hidden_size={self.text.hidden_size}); pick a divisor")
        n = self.fusion.tower_layers
        for tower, name in ((self.video, "video"), (self.text, "text")):
            if n > tower.num_layers:
                raise ValueError(f"fusion.num_layers={n} exceeds {name}.num_layers={tower.num_layers}")
        self.video = dataclasses.replace(self.video, fusion_layers=n, context_dim=self.text.hidden_size if n else None)
        self.text = dataclasses.replace(self.text, fusion_layers=n, context_dim=self.video.hidden_size if n else None)


class MLMHead(nn.Module):
    """BERT's transform (dense, GELU, LayerNorm) + a decoder tied to the word embeddings."""

    def __init__(self, dim: int, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self._words = [word_embeddings]   # a list, so the tied weight is not registered twice

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), self._words[0].weight, self.bias)


class DualResidual(nn.Module):
    """`fusion.dual_residual`: a projection of the dual embeddings' element-wise product (whose sum is
    their cosine), added to the fused pair representation. Zero-initialised — a model gains it without
    changing its outputs, and building it draws nothing from the RNG, so every other weight and the data
    order start as without it —; scaled by the embedding width, so that the product's entries are O(1)."""

    def __init__(self, embed_dim: int, fused_dim: int):
        super().__init__()
        self.scale = float(embed_dim)
        self.weight = nn.Parameter(torch.zeros(fused_dim, embed_dim))
        self.bias = nn.Parameter(torch.zeros(fused_dim))

    def forward(self, pooled: torch.Tensor, video_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return pooled + F.linear(video_emb * text_emb * self.scale, self.weight, self.bias)


class VideoLanguageModel(SavedModel, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.video)
        self.text = TextEncoder(cfg.text)
        vw, tw = cfg.video.hidden_size, cfg.text.hidden_size
        self.video_proj = nn.Linear(vw, cfg.embed_dim)
        self.text_proj = nn.Linear(tw, cfg.embed_dim)
        self.logit_scale = LogitScale()
        fusion_cls = FUSIONS[cfg.fusion.kind]
        self.fusion = fusion_cls(tw, vw, cfg.fusion) if fusion_cls is not None else None
        self.fused_dim = self.fusion.fused_dim if self.fusion is not None else 0
        if self.fusion is not None:
            self.vtm_head = nn.Linear(self.fused_dim, 2)
            self.mlm_head = MLMHead(tw, self.text.embeddings.word_embeddings)
        self.dual_residual = DualResidual(cfg.embed_dim, self.fused_dim) if cfg.fusion.dual_residual else None
        self.qa_head = self._make_qa_head(cfg.num_answers) if cfg.num_answers else None

    # ---------------------------------------------------------------- construction / persistence

    @property
    def has_fusion(self) -> bool:
        """Whether the model has a cross-modal path (matching, MLM and QA need one)."""
        return self.fusion is not None

    def _make_qa_head(self, num_answers: int) -> nn.Module:
        if not self.has_fusion:
            raise ValueError("open-ended QA needs a fusion model (fusion.kind 'encoder' or 'backbone')")
        d = self.fused_dim
        return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.LayerNorm(2 * d), nn.Linear(2 * d, num_answers))

    def set_num_answers(self, num_answers: int) -> None:
        """(Re)create the QA head for an answer vocabulary of `num_answers` (fine-tuning)."""
        self.cfg.num_answers = num_answers
        self.qa_head = self._make_qa_head(num_answers)

    config_class = ModelConfig   # SavedModel: save_pretrained / from_pretrained / read_vocab

    @classmethod
    def from_config_dict(cls, data: dict, where: str = "model", load_text_weights: bool = False) -> VideoLanguageModel:
        """Build from a (saved) config dict; `load_text_weights=False` skips loading MiniLM weights that
        a checkpoint will overwrite anyway."""
        cfg = from_dict(ModelConfig, data, where="model")
        if not load_text_weights:
            cfg.text = dataclasses.replace(cfg.text, pretrained=None)
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, directory: str | Path, strict: bool = True) -> VideoLanguageModel:
        """Rebuild from `directory/config.json` and load `model.safetensors` (strict by default).

        `directory` is a saved model (`final/`) or any of the Trainer's `checkpoints/step_*`."""
        from evl.checkpoint import MODEL_PREFIX, check_shapes
        from evl.errors import CheckpointError

        cfg = cls.checkpoint_config(directory)
        # build on the meta device first (no memory) and compare with the weights file's header, so an
        # edited or corrupt config.json (text.vocab_size=10**12) is an error, not a huge allocation
        if strict:   # non-strict loading skips mismatched tensors instead
            try:
                with torch.device("meta"):
                    shapes = {k: tuple(v.shape) for k, v in cls.from_config_dict(cfg["model"]).state_dict().items()}
            except ConfigError as e:   # a size past its bound (evl.config.MAX_*): the file is named
                raise CheckpointError(f"{directory}/config.json: {e}") from None
            check_shapes(shapes, directory, strip_prefix=MODEL_PREFIX)
        # also reads the Trainer's intermediate checkpoints (checkpoints/step_*), whose weights are
        # those of the training objective module, i.e. this model under "model."
        return cls.load_weights(cls.from_config_dict(cfg["model"]), directory, strict)

    # ---------------------------------------------------------------- dual path

    def video_features(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None,
                       keep_index: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                       hooks=None) -> VideoFeatures:
        """Dual-mode video tower. `keep_index` / `hidden` / `hooks`: see `VideoEncoder.embed` / `run_blocks`."""
        enc = self.video
        tokens = enc.embed(frames, frame_mask, keep_index, hidden)
        lower = None
        if self.cfg.video.first_fused_layer < len(enc.blocks):
            tokens = enc.run_blocks(tokens, 0, self.cfg.video.first_fused_layer, hooks=hooks)
            lower = tokens
            tokens = enc.run_blocks(tokens, self.cfg.video.first_fused_layer, hooks=hooks)
        else:
            tokens = enc.run_blocks(tokens, hooks=hooks)
        out = enc.finalize(tokens.x)
        emb = F.normalize(self.video_proj(enc.pool(out, tokens.key_mask)), dim=-1)
        return VideoFeatures(emb, out, tokens.key_mask, lower, tokens.positions, tokens.grid, hooks)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        x, first = self.text.unlocked_input(input_ids, attention_mask)
        lower = None
        for i in range(first, len(self.text.layers)):
            if i == self.cfg.text.first_fused_layer:
                lower = x
            x = self.text.layers[i](x, attention_mask)
        # mean pooling: what MiniLM's sentence embedding was trained with
        emb = F.normalize(self.text_proj(masked_mean(x, attention_mask)), dim=-1)
        return TextFeatures(emb, x, attention_mask, lower)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C, H, W) normalised frames → (B, embed_dim) unit vectors (dual encoder)."""
        return self.video_features(frames, frame_mask).emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids → (B, embed_dim) unit vectors (dual encoder)."""
        return self.text_features(input_ids, attention_mask).emb

    # ---------------------------------------------------------------- fusion path

    def fuse(self, video: VideoFeatures, text: TextFeatures) -> FusionOutput:
        """Cross-modal encoding of row-aligned pairs (video[i], text[i])."""
        if self.fusion is None:
            raise ValueError("this model has no fusion (fusion.kind='none'); matching, MLM and QA need one")
        out = self.fusion.fuse(self, video, text)
        if self.dual_residual is not None:
            out.pooled = self.dual_residual(out.pooled, video.emb, text.emb)
        return out

    def score_pairs(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """Matching logits (N, 2) for row-aligned pairs; softmax[:, 1] is the match probability."""
        return self.vtm_head(self.fuse(video, text).pooled)

    def mlm_logits(self, fused_text_tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary logits at the masked positions only (labels != -100): (M, V) and targets (M,).
        Projecting only the masked ~15% of tokens onto the 30k vocabulary saves most of the head's cost."""
        pos = labels != -100
        return self.mlm_head(fused_text_tokens[pos]), labels[pos]

    def answer(self, video: VideoFeatures, question: TextFeatures) -> torch.Tensor:
        """Open-ended QA logits (B, num_answers) from the fused (video, question) pair."""
        if self.qa_head is None:
            raise ValueError("this model has no QA head; fine-tune with task=qa (sets model.num_answers)")
        return self.qa_head(self.fuse(video, question).pooled)

    def option_scores(self, video: VideoFeatures, option_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
        """(B, K) multiple-choice scores of K options per clip: dual cosine similarity (× logit scale)
        plus, with a fusion path, each (clip, option) pair's matching log-odds — EgoVLPv2's ensemble."""
        b, k, length = option_ids.shape
        text = self.text_features(option_ids.reshape(b * k, length), option_mask.reshape(b * k, length))
        rows = torch.arange(b, device=option_ids.device).repeat_interleave(k)
        dual = (video.emb[rows] * text.emb).sum(-1) * self.logit_scale()
        if not self.has_fusion:
            return dual.view(b, k)
        logits = self.score_pairs(video.select(rows), text)
        return (dual + logits[:, 1] - logits[:, 0]).view(b, k)


def build_model(cfg: ModelConfig | dict) -> VideoLanguageModel:
    """Model from a config (dataclass or dict, e.g. a packaged `configs/<name>.yaml`'s `model:`)."""
    if isinstance(cfg, dict):
        cfg = from_dict(ModelConfig, cfg, where="model")
    return VideoLanguageModel(cfg)
