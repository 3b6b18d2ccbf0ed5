"""Vector-quantized video tokenizer: the targets of E-ViLM's masked video modelling.

After BEiT-v2's VQ-KD. Per tubelet token:

    encoder (an evl VideoEncoder) → Linear·Tanh·Linear to a `code_dim` space → NormEMAQuantizer
    → decoder (Linear to the width, learned positions, `decoder_layers` pre-LN blocks) → Linear·Tanh·Linear

The decoder's output is the reconstruction target: a frozen teacher's feature of the same tubelet
("semantic", loss 1 − cos, BEiT-v2's) or the tubelet's pixels normalised per tubelet and channel
("pixel", MSE — the VQ-VAE variant of the ablation). Once trained, `encode(frames)` gives each
tubelet its code in [0, K): the classes masked video modelling predicts.

The quantizer (BEiT-v2's NormEMA): codes and inputs are l2-normalised, the nearest code is the one of
highest cosine, the gradient passes straight through (z + (z_q − z).detach()), the loss is the
commitment term MSE(z, z_q.detach()), and the codebook moves only by EMA (decay 0.99) towards the
normalised mean of its assigned inputs; codes no input chose keep their vector. It is initialised by
cosine k-means on the first training batch. `restart_dead` > 0 (not in BEiT-v2) re-seeds codes whose
EMA usage fell below that count with random inputs of the batch. Under DDP the per-code counts and
sums are all-reduced, so every rank keeps the same codebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evl.config import MAX_COUNT, MAX_LAYERS, MAX_WIDTH, check_range
from evl.errors import ConfigError
from evl.models.layers import Block
from evl.models.saved import SavedModel
from evl.models.video import VideoEncoder, VideoEncoderConfig


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor   # (..., d) straight-through: forward = the code vector, gradient = identity
    codes: torch.Tensor       # (...) long
    commit_loss: torch.Tensor
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram: K when all codes are used evenly
    used: torch.Tensor        # fraction of the codebook used by this batch


def cosine_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(k, d) unit centroids of unit rows `x` by spherical k-means; starts from k rows drawn from `x`
    (with replacement when there are fewer rows than k); an empty cluster keeps its centroid."""
    n = x.shape[0]
    start = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centroids = x[start].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centroids)
    return centroids


class NormEMAQuantizer(nn.Module):
    """K unit-norm codes of width d; see the module docstring."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, kmeans_iters: int = 10,
                 restart_dead: float = 0.0):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"decay={decay} must be in (0, 1) (BEiT-v2: 0.99)")
        self.num_codes, self.dim, self.decay = num_codes, dim, decay
        self.kmeans_iters, self.restart_dead = kmeans_iters, restart_dead
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=1))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("initialized", torch.tensor(False))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code (highest cosine) of each row of `z` (..., d)."""
        flat = F.normalize(z.reshape(-1, self.dim).float(), dim=1)
        return (flat @ self.codebook.T).argmax(dim=1).view(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = F.normalize(z.reshape(-1, self.dim).float(), dim=1)
        if self.training and not bool(self.initialized):
            self._kmeans_init(flat.detach())
        codes = (flat @ self.codebook.T).argmax(dim=1)
        zq = self.codebook[codes]
        commit = F.mse_loss(flat, zq.detach())
        counts = torch.bincount(codes, minlength=self.num_codes).float()
        if self.training:
            counts = self._ema_update(flat.detach(), codes, counts)
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        quantized = flat + (zq - flat).detach()
        return QuantizerOutput(quantized.view(*z.shape[:-1], self.dim).to(z.dtype), codes.view(z.shape[:-1]),
                               commit, perplexity, (counts > 0).float().mean())

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            centroids = torch.zeros_like(self.codebook)
        else:
            centroids = cosine_kmeans(flat, self.num_codes, self.kmeans_iters,
                                      torch.Generator().manual_seed(0) if flat.device.type == "cpu" else None)
        self.codebook.copy_(_all_reduce(centroids))   # rank 0's centroids (the others add zeros)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros_like(self.codebook).index_add_(0, codes, flat)
        counts, sums = _all_reduce(counts), _all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        means = F.normalize(sums / counts.clamp_min(1.0)[:, None], dim=1)
        means = torch.where(counts[:, None] > 0, means, self.codebook)
        self.codebook.copy_(F.normalize(self.codebook * self.decay + means * (1 - self.decay), dim=1))
        if self.restart_dead > 0:
            self._restart(flat)
        return counts

    def _restart(self, flat: torch.Tensor) -> None:
        dead = (self.cluster_size < self.restart_dead).nonzero().flatten()
        if dead.numel() == 0:
            return
        pick = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = torch.zeros(dead.numel(), self.dim, device=flat.device)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            fresh = flat[pick]
        self.codebook[dead] = _all_reduce(fresh)
        self.cluster_size[dead] = self.restart_dead


# ------------------------------------------------------------------------------------------ tokenizer

TARGETS = ("semantic", "pixel")


@dataclass
class VQTokenizerConfig:
    """The tokenizer's shape. `target_dim` is the width of what the decoder reconstructs: the teacher's
    hidden size (semantic) or t·p·p·C (pixel); `evl vq train` sets it."""

    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    num_codes: int = 1024
    code_dim: int = 32
    decay: float = 0.99
    kmeans_iters: int = 10
    restart_dead: float = 0.0
    decoder_layers: int = 1
    target: Literal["semantic", "pixel"] = "semantic"
    target_dim: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"tokenizer.target={self.target!r} is not one of {list(TARGETS)}")
        for key in ("num_codes", "code_dim", "decoder_layers", "kmeans_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"tokenizer.{key}={getattr(self, key)} must be >= 1")
        if self.num_codes < 2:
            raise ConfigError(f"tokenizer.num_codes={self.num_codes} must be >= 2")
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"tokenizer.decay={self.decay} must be in (0, 1) (BEiT-v2: 0.99)")
        if self.restart_dead < 0:
            raise ConfigError(f"tokenizer.restart_dead={self.restart_dead} must be >= 0 (0 = off)")
        check_range("tokenizer.num_codes", self.num_codes, 2, MAX_COUNT)
        check_range("tokenizer.code_dim", self.code_dim, 1, MAX_WIDTH)
        check_range("tokenizer.decoder_layers", self.decoder_layers, 1, MAX_LAYERS)
        check_range("tokenizer.kmeans_iters", self.kmeans_iters, 1, 10_000)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


@dataclass
class TokenizerOutput:
    loss: torch.Tensor
    reconstruction: torch.Tensor
    commit: torch.Tensor
    perplexity: torch.Tensor
    used: torch.Tensor
    codes: torch.Tensor


class VQTokenizer(SavedModel, nn.Module):
    """Tubelets → codes, trained to reconstruct a target per tubelet; see the module docstring."""

    kind = "vq_tokenizer"        # SavedModel: save_pretrained(directory, metadata=...) / from_pretrained
    config_key = "tokenizer"
    config_class = VQTokenizerConfig
    weights_file = "tokenizer.safetensors"
    what = "a VQ tokenizer"
    how_to_get = "train one with `evl vq train` and pass its final/ folder"

    def __init__(self, cfg: VQTokenizerConfig):
        super().__init__()
        if cfg.target_dim < 1:
            raise ConfigError("tokenizer.target_dim is not set: the width of the reconstruction target "
                              "(the teacher's hidden size, or t·p·p·C pixels)")
        self.cfg = cfg
        d = cfg.video.hidden_size
        t0, h0, w0 = cfg.video.native_grid
        self.encoder = VideoEncoder(cfg.video)
        self.to_code = _mlp(d, d, cfg.code_dim)
        self.quantizer = NormEMAQuantizer(cfg.num_codes, cfg.code_dim, cfg.decay, cfg.kmeans_iters, cfg.restart_dead)
        self.from_code = nn.Linear(cfg.code_dim, d)
        self.decoder_pos = nn.Parameter(torch.zeros(1, t0 * h0 * w0, d))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.decoder = nn.ModuleList(Block(d, cfg.video.num_heads) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.head = _mlp(d, d, cfg.target_dim)
        self.metadata: dict[str, Any] = {}   # what `evl vq train` measured (codebook usage), from config.json

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cfg.video.native_grid

    def _patch_features(self, frames: torch.Tensor) -> torch.Tensor:
        out = self.encoder(frames)
        return out.tokens[:, 1:] if self.encoder.cls_token is not None else out.tokens

    def quantize(self, frames: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.to_code(self._patch_features(frames)))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N) codes of the clips' tubelets, in the video tower's token order; deterministic."""
        return self.quantizer.lookup(self.to_code(self._patch_features(frames)))

    def forward(self, frames: torch.Tensor, target: torch.Tensor) -> TokenizerOutput:
        """Loss of reconstructing `target` (B, N, target_dim) from the codes of `frames`."""
        q = self.quantize(frames)
        x = self.from_code(q.quantized) + self.decoder_pos
        for block in self.decoder:
            x = block(x)
        pred = self.head(self.decoder_norm(x)).float()
        if self.cfg.target == "semantic":
            rec = (1 - F.cosine_similarity(pred, target.float(), dim=-1)).mean()
        else:
            rec = F.mse_loss(pred, target.float())
        return TokenizerOutput(rec + q.commit_loss, rec, q.commit_loss, q.perplexity, q.used, q.codes)

    # ---- saving: safetensors + config.json (with the codebook usage), loaded frozen by MVM ----

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VQTokenizer:
        """A saved tokenizer, frozen, in eval mode. Errors name the folder."""
        tok = super().from_pretrained(directory)
        tok.metadata = cls.checkpoint_config(directory).get("metadata", {})
        for p in tok.parameters():
            p.requires_grad_(False)
        return tok.eval()

    def train(self, mode: bool = True) -> VQTokenizer:
        # a loaded (frozen) tokenizer stays in eval mode inside a training objective: no EMA updates
        return super().train(mode and any(p.requires_grad for p in self.parameters()))


def check_same_tubelets(mine: VideoEncoderConfig, theirs: VideoEncoderConfig, where: str,
                        names: tuple[str, str] = ("the tokenizer", "the model")) -> None:
    """A tokenizer and the model it teaches (or its teacher) must cut clips into the same tubelets."""
    for key in ("patch_size", "tubelet_size", "image_size", "num_frames", "in_channels"):
        a, b = getattr(mine, key), getattr(theirs, key)
        if a != b:
            raise ConfigError(f"{where}: {names[0]} has video.{key}={a} but {names[1]} has video.{key}={b}; "
                              "both must cut clips into the same tubelets (patch size, frames, image size)")


__all__ = ["NormEMAQuantizer", "QuantizerOutput", "TokenizerOutput", "VQTokenizer", "VQTokenizerConfig",
           "check_same_tubelets", "cosine_kmeans"]
