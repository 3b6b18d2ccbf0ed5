"""`FrameQAModel`: video QA from k of N candidate frames — the model VLAP trains and `evl ask` runs.

    frames (B, N, C, H, W) ──video.embed (patch embeddings only)──▶ selector ──▶ k picks (temporal order)
    k picked frames ──frozen video tower, frame by frame──▶ (1+P) tokens each ──QFormer + question──▶ M each
    [CLS, question tokens, k·M query outputs + the picks' candidate positions] ──answerer──▶ answer logits

The video and text towers come from any evl checkpoint (`FrameQAModel.from_backbone`) and stay frozen:
this is an image-language model run on frames (InstructBLIP's layout, at evl's sizes). A candidate goes
through the video tower alone, as one tubelet slot (the temporal position embedding interpolated to
that one slot), filled per `frame_input`: `frame` repeats the frame `tubelet_size` times (a still
image: no motion), `tubelet` takes the frame and the next `tubelet_size - 1` candidates (clamped to the
clip's last frame), so each position carries a short motion the tower was pre-trained on, at the same
token count and cost. The answerer sees which candidate
each pick was (a learned embedding per candidate index), so temporal questions can use the order.

Selectors (`select`): `all` (k = N), `uniform`, `prompter` (VLAP's Frame-Prompter) and `localizer`
(SeViLA-style: its own QFormer scores every candidate frame on its own; the top k are kept, in
temporal order). The choice is config: one forward for all of them (`evl.techniques.vlap.frame_prompter`).

Checkpoints: `save_pretrained` writes the whole model (frozen towers included) with config kind
"frame_qa" and the answer vocabulary, so `evl ask` needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from evl.config import MAX_COUNT, MAX_LAYERS, MAX_WIDTH, check_range, from_dict
from evl.data import MAX_FRAMES
from evl.errors import ConfigError
from evl.models.layers import Block
from evl.models.saved import SavedModel
from evl.models.selection import Selection, topk_pick
from evl.models.text import TextEncoder, TextEncoderConfig, masked_mean
from evl.models.video import VideoEncoder, VideoEncoderConfig
from evl.techniques.vlap.frame_prompter import FramePrompter, gumbel_pick, temperature_at, uniform_pick
from evl.techniques.vlap.qformer import QFormer, QFormerConfig

KIND = "frame_qa"
SELECTORS = ("all", "uniform", "prompter", "localizer")
FRAME_INPUTS = ("frame", "tubelet")


@dataclass
class FrameQAConfig:
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_candidates: int = 16      # N frames sampled uniformly over the whole video; at most MAX_FRAMES (256)
    num_frames: int = 4           # k frames the answerer sees (= N for select: all)
    select: Literal["all", "uniform", "prompter", "localizer"] = "all"
    question_aware: bool = True   # Frame-Prompter: the question steers the selection (false: frames only)
    prompter_width: int = 64
    answerer_layers: int = 2
    answerer_heads: int = 4
    num_answers: int = 0          # open-ended answer classes (set from the answer vocabulary)
    tau_start: float = 1.0        # Gumbel temperature, exponential decay over training
    tau_end: float = 0.01
    max_text_len: int = 32        # question tokens (as in training)
    frame_input: Literal["frame", "tubelet"] = "frame"   # what one candidate position shows the tower

    def __post_init__(self) -> None:
        if self.select not in SELECTORS:
            raise ConfigError(f"select: {self.select!r} is not one of {list(SELECTORS)}")
        if self.frame_input not in FRAME_INPUTS:
            raise ConfigError(f"model.frame_input: {self.frame_input!r} is not one of {list(FRAME_INPUTS)} (frame: a "
                              "still frame per position; tubelet: the frame and its next ones, to show motion)")
        if self.num_candidates < 1 or self.num_frames < 1:
            raise ConfigError(f"num_candidates ({self.num_candidates}) and num_frames ({self.num_frames}) must be >= 1")
        if self.select == "all":
            self.num_frames = self.num_candidates
        if self.num_candidates > MAX_FRAMES:
            raise ConfigError(f"num_candidates={self.num_candidates}: at most {MAX_FRAMES} candidate frames per clip "
                              "(each is decoded and run through the video tower); lower model.num_candidates")
        if self.num_frames > self.num_candidates:
            raise ConfigError(f"num_frames={self.num_frames} exceeds num_candidates={self.num_candidates}: the "
                              "selector picks k of N candidate frames")
        check_range("model.prompter_width", self.prompter_width, 1, MAX_WIDTH)
        check_range("model.answerer_layers", self.answerer_layers, 1, MAX_LAYERS)
        check_range("model.answerer_heads", self.answerer_heads, 1, MAX_WIDTH)
        if self.qformer.hidden_size % self.answerer_heads:
            raise ConfigError(f"model.answerer_heads={self.answerer_heads} does not divide the answerer's width "
                              f"(model.qformer.hidden_size={self.qformer.hidden_size}); pick a divisor")
        check_range("model.num_answers", self.num_answers, 0, MAX_COUNT, " answer classes")
        check_range("model.max_text_len", self.max_text_len, 1, self.text.max_position_embeddings,
                    f" question tokens (the text tower has {self.text.max_position_embeddings} positions)")
        if not (0 < self.tau_end <= self.tau_start and math.isfinite(self.tau_start)):
            raise ConfigError(f"need finite Gumbel temperatures 0 < tau_end <= tau_start, got tau_start={self.tau_start}, "
                              f"tau_end={self.tau_end}; set model.tau_start and model.tau_end (default 1 and 0.01)")


@dataclass
class FrameQAOutput:
    logits: torch.Tensor          # (B, num_answers) or (B,) for multiple-choice scoring
    selection: Selection
    queries: torch.Tensor         # (B, k·M, d) the QFormer outputs the answerer read (distillation)


class Localizer(nn.Module):
    """SeViLA-style: its own QFormer reads each candidate frame with the question → one score per frame."""

    def __init__(self, qformer: QFormer):
        super().__init__()
        self.qformer = qformer
        self.head = nn.Linear(qformer.cfg.hidden_size, 1)

    def forward(self, frames: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        b, n = frames.shape[:2]
        q = question.repeat_interleave(n, dim=0)
        qm = question_mask.repeat_interleave(n, dim=0)
        out = self.qformer(frames.flatten(0, 1), q, qm)
        return self.head(out.mean(dim=1)).view(b, n)


class FrameQAModel(SavedModel, nn.Module):
    kind = KIND                  # SavedModel: save_pretrained (+ answers.json) / from_pretrained / read_vocab
    config_class = FrameQAConfig
    what = "a frame-QA model (kind 'frame_qa')"
    how_to_get = "train one with `evl vlap train`"

    def __init__(self, cfg: FrameQAConfig):
        super().__init__()
        self.cfg = cfg
        self.video = VideoEncoder(cfg.video)
        self.text = TextEncoder(cfg.text)
        for p in [*self.video.parameters(), *self.text.parameters()]:
            p.requires_grad_(False)
        d, dv, dt = cfg.qformer.hidden_size, cfg.video.hidden_size, cfg.text.hidden_size
        self.question_proj = nn.Linear(dt, d)
        self.qformer = QFormer(cfg.qformer, dv)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.frame_pos = nn.Parameter(torch.randn(cfg.num_candidates, d) * 0.02)
        self.query_slot = nn.Parameter(torch.randn(cfg.qformer.num_queries, d) * 0.02)
        self.answerer = nn.ModuleList(Block(d, cfg.answerer_heads) for _ in range(cfg.answerer_layers))
        self.norm = nn.LayerNorm(d)
        self.qa_head = nn.Linear(d, cfg.num_answers) if cfg.num_answers else None
        self.mc_head = nn.Linear(d, 1)
        self.prompter = (FramePrompter(dv, dt, cfg.prompter_width, cfg.question_aware)
                         if cfg.select == "prompter" else None)
        self.localizer = Localizer(copy.deepcopy(self.qformer)) if cfg.select == "localizer" else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.video.eval()     # frozen towers: no dropout, whatever the mode
        self.text.eval()
        return self

    # ------------------------------------------------------------------ frozen towers

    def _slots(self, frames: torch.Tensor, index: torch.Tensor | None = None,
               frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C, H, W) candidates → (B·K, tubelet, C, H, W): one tubelet slot per position in `index`
        (B, K) (all N when None), filled per `frame_input` (see the module docstring)."""
        b, n = frames.shape[:2]
        t = self.cfg.video.tubelet_size
        if index is None:
            index = torch.arange(n, device=frames.device).expand(b, n)
        if self.cfg.frame_input == "frame":
            index = index[..., None].expand(*index.shape, t)
        else:   # the next candidates, never past the clip's last decoded frame
            last = (frame_mask.sum(dim=1).clamp(min=1) - 1 if frame_mask is not None
                    else torch.full((b,), n - 1, device=frames.device))
            index = torch.minimum(index[..., None] + torch.arange(t, device=frames.device), last.view(b, 1, 1))
        rows = torch.arange(b, device=frames.device).view(b, 1, 1)
        return frames[rows, index].flatten(0, 1)

    @torch.no_grad()
    def frame_tokens(self, frames: torch.Tensor, index: torch.Tensor | None = None,
                     frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C, H, W) candidates → (B, K, 1+P, Dv): the frozen video tower run on each position in
        `index` (B, K) alone (all N when None)."""
        b = frames.shape[0]
        out = self.video(self._slots(frames, index, frame_mask)).tokens
        return out.view(b, -1, *out.shape[1:])

    @torch.no_grad()
    def patch_embeddings(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C, H, W) → (B, N, P, Dv): the tower's patch embeddings only (the prompter's cheap input)."""
        b, n = frames.shape[:2]
        tokens = self.video.embed(self._slots(frames, None, frame_mask))
        x = tokens.x[:, 1:] if self.video.cls_token is not None else tokens.x
        return x.reshape(b, n, *x.shape[1:])

    @torch.no_grad()
    def question_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, attention_mask).tokens

    # ------------------------------------------------------------------ selection and answering

    def select(self, frame_mask: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
               patches: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
               progress: float = 1.0) -> Selection:
        """Which k candidates to read. `patches` (prompter) / `tokens` of all N (localizer)."""
        cfg = self.cfg
        if cfg.select == "all":
            n = frame_mask.shape[1]
            return Selection(torch.arange(n, device=frame_mask.device).expand(frame_mask.shape[0], n), frame_mask.bool())
        if cfg.select == "uniform":
            return uniform_pick(frame_mask, cfg.num_frames)
        if cfg.select == "prompter":
            logits = self.prompter(patches, frame_mask, masked_mean(question, question_mask))
            tau = temperature_at(progress, cfg.tau_start, cfg.tau_end)
            return gumbel_pick(logits, frame_mask, cfg.num_frames, tau, training=self.training)
        with torch.no_grad():   # the localizer learns from pseudo-labels, not from the answer loss
            scores = self.localizer(tokens, self.question_proj(question), question_mask)
        return topk_pick(scores, frame_mask, cfg.num_frames)

    def read(self, picked: torch.Tensor, sel: Selection, question: torch.Tensor, question_mask: torch.Tensor,
             options: bool = False) -> FrameQAOutput:
        """(B, k, 1+P, Dv) picked frames' tokens → answer logits (or one option score each)."""
        b, k = picked.shape[:2]
        m = self.cfg.qformer.num_queries
        q = self.question_proj(question)
        queries = self.qformer(picked.flatten(0, 1), q.repeat_interleave(k, dim=0),
                               question_mask.repeat_interleave(k, dim=0)).view(b, k * m, -1)
        placed = queries + (self.frame_pos[sel.index][:, :, None] + self.query_slot).flatten(1, 2)
        x = torch.cat([self.cls.expand(b, -1, -1), q, placed], dim=1)
        key_mask = torch.cat([question_mask.new_ones(b, 1), question_mask,
                              sel.mask.repeat_interleave(m, dim=1).to(question_mask.dtype)], dim=1)
        for block in self.answerer:
            x = block(x, key_mask)
        pooled = self.norm(x[:, 0])
        if options:
            return FrameQAOutput(self.mc_head(pooled).squeeze(-1), sel, queries)
        if self.qa_head is None:
            raise ConfigError("this frame-QA model has no answer head (num_answers=0); train it on open-ended QA")
        return FrameQAOutput(self.qa_head(pooled), sel, queries)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, options: bool = False) -> FrameQAOutput:
        """From decoded candidate frames (B, N, C, H, W): only the picked frames run the tower's blocks
        (all N with `all`, and with `localizer`, which scores every frame)."""
        if self.training and self.cfg.select == "prompter":
            raise RuntimeError("the Frame-Prompter learns through the straight-through weights over all N "
                               "candidates' features: train with from_features (evl vlap train), not from frames")
        b, n = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(b, n, dtype=torch.bool, device=frames.device)
        question = self.question_features(input_ids, attention_mask)
        patches = self.patch_embeddings(frames, frame_mask) if self.cfg.select == "prompter" else None
        tokens = self.frame_tokens(frames, None, frame_mask) if self.cfg.select in ("all", "localizer") else None
        sel = self.select(frame_mask, question, attention_mask, patches, tokens)
        if tokens is None:
            picked = self.frame_tokens(frames, sel.index, frame_mask)
        else:
            picked = gather_picks(tokens, sel)
        return self.read(picked, sel, question, attention_mask, options)

    def from_features(self, tokens: torch.Tensor, patches: torch.Tensor, frame_mask: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor, progress: float = 1.0,
                      options: bool = False) -> FrameQAOutput:
        """The same answer from pre-extracted features of all N candidates (training: the frozen
        tower's outputs are extracted once, `evl.techniques.vlap.features.extract_features`)."""
        question = self.question_features(input_ids, attention_mask)
        sel = self.select(frame_mask, question, attention_mask, patches, tokens, progress)
        return self.read(gather_picks(tokens, sel), sel, question, attention_mask, options)

    def option_scores(self, frames: torch.Tensor, frame_mask: torch.Tensor | None, option_ids: torch.Tensor,
                      option_mask: torch.Tensor) -> torch.Tensor:
        """(B, K) multiple-choice scores: each option (question + answer text) read as the question."""
        b, k, length = option_ids.shape
        rep = frames.repeat_interleave(k, dim=0)
        fm = frame_mask.repeat_interleave(k, dim=0) if frame_mask is not None else None
        out = self(rep, fm, option_ids.reshape(b * k, length), option_mask.reshape(b * k, length), options=True)
        return out.logits.view(b, k)

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_backbone(cls, checkpoint: str | Path, cfg: FrameQAConfig) -> FrameQAModel:
        """A new model whose frozen towers are those of an evl checkpoint (`evl pretrain`'s final/)."""
        from evl.checkpoint import read_config
        from evl.models.model import VideoLanguageModel

        if not (Path(checkpoint) / "config.json").is_file():
            raise ConfigError(f"backbone={checkpoint} is not an evl checkpoint folder (no config.json); pass e.g. "
                              "runs/pretrain-tiny/final")
        if read_config(checkpoint).get("kind") == KIND:
            raise ConfigError(f"backbone={checkpoint} is a frame-QA checkpoint; start from it with init= instead")
        base = VideoLanguageModel.from_pretrained(checkpoint)
        video = dataclasses.replace(base.cfg.video, fusion_layers=0, context_dim=None)
        text = dataclasses.replace(base.cfg.text, fusion_layers=0, context_dim=None, pretrained=None)
        model = cls(dataclasses.replace(cfg, video=video, text=text))
        model.video.load_state_dict(_unfused(base.video.state_dict()), strict=True)
        model.text.load_state_dict(_unfused(base.text.state_dict()), strict=True)
        return model

    @classmethod
    def from_config_dict(cls, data: dict, where: str = "model") -> FrameQAModel:
        cfg = from_dict(FrameQAConfig, data, where=where)
        cfg.text = dataclasses.replace(cfg.text, pretrained=None)   # the checkpoint holds the towers' weights
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FrameQAModel:
        return super().from_pretrained(directory).eval()


def gather_picks(tokens: torch.Tensor, sel: Selection) -> torch.Tensor:
    """(B, N, ...) → (B, k, ...): by the straight-through weights in training, by index otherwise."""
    if sel.weights is not None:
        return torch.einsum("bkn,bn...->bk...", sel.weights.to(tokens.dtype), tokens)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
    return tokens[rows, sel.index]


def _unfused(state: dict) -> dict:
    """A tower's weights without its fusion cross-attention (frame QA runs the towers unimodal)."""
    return {k: v for k, v in state.items() if ".cross_attn." not in k}


__all__ = ["FRAME_INPUTS", "FrameQAConfig", "FrameQAModel", "FrameQAOutput", "Localizer", "SELECTORS"]
