"""Space-time ViT video encoder: tubelet patches, joint or divided attention, fusion-ready blocks.

One encoder serves every recipe:

* **joint** layout (ViViT / VideoMAE): every token attends to every token of the clip. Weights import
  from HuggingFace / original VideoMAE checkpoints and reproduce `VideoMAEModel` exactly.
* **divided** layout (TimeSformer, the EgoVLPv2 video tower): in each block, time attention across
  temporal slots at each spatial location, then space attention within each slot, then (top
  `fusion_layers` blocks) gated cross-attention to text, then the MLP.

The tower runs as ONE block loop, `run_blocks`, over a `VideoTokens` state that carries its token grid
(which time slot and patch each surviving token came from). Everything that runs video blocks — the
dual path, fusion in the backbone, masked modelling — goes through it:

    tokens = enc.embed(frames, frame_mask, keep_index=None, hidden=None)
    tokens = enc.run_blocks(tokens, start=0, stop=None, context=None, context_mask=None, hooks=None)
    out = enc.finalize(tokens.x)

* `keep_index` drops tokens *before* the blocks, so the blocks pay only for the kept tokens (MAE).
* `hidden` replaces hidden patches by a learnable mask token instead (BEiT / masked video modelling:
  the model sees the whole sequence and predicts what the masked positions held).
* `hooks` are token operations (drop, merge, select frames) run before chosen blocks: a mapping
  layer index → callables `VideoTokens -> VideoTokens`; index i runs before block i, index
  `num_layers` after the last block. They belong to a technique, not to the model, so they are
  passed per call.
* `context` (text tokens) switches the gated cross-attention of the fused top blocks on (EgoVLPv2).

Padded frames (`frame_mask`) are zeroed and masked out of every attention key set and of pooling, so
their values can never leak into valid outputs. When nothing is padded no mask is built at all, so
attention takes SDPA's unmasked fast path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evl.config import MAX_LAYERS, MAX_VIDEO_TOKENS, MAX_WIDTH, check_range, from_dict, to_dict
from evl.data import MAX_FRAMES
from evl.errors import ConfigError
from evl.models.layers import MLP, GatedCrossAttention, MultiHeadAttention
from evl.models.positions import PositionEmbedding
from evl.models.tokens import TokenHook, VideoEncoderOutput, VideoTokens, apply_hooks


@dataclass
class VideoEncoderConfig:
    """Shape of the video tower. Defaults: a ViT-S/16 with 2-frame tubelets on 16 frames of 224²."""

    image_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    num_frames: int = 16
    in_channels: int = 3
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    attention: Literal["joint", "divided"] = "joint"
    use_cls_token: bool = True
    pos_embed: Literal["learned", "sincos"] = "learned"
    final_norm: bool = True
    grad_checkpointing: bool = False
    fusion_layers: int = 0
    context_dim: int | None = None
    # 0: each tubelet is projected linearly (ViT). C > 0: a convolutional stem first — per frame, two 3×3
    # stride-2 convolutions (C/2 then C channels, GELU) — and the tubelet projection reads the stem's map
    # with a (tubelet, patch/4, patch/4) kernel: same token grid, shared local detectors (`ConvStem`)
    conv_stem: int = 0

    @property
    def first_fused_layer(self) -> int:
        """Index of the first layer with cross-attention to the other modality (= num_layers: none);
        the one definition every user of the fused layers reads (the towers, the model, backbone fusion)."""
        return self.num_layers - self.fusion_layers

    def __post_init__(self) -> None:
        if self.attention not in ("joint", "divided"):
            raise ConfigError(f"video.attention: {self.attention!r} is not one of ['joint', 'divided']")
        if self.pos_embed not in ("learned", "sincos"):
            raise ConfigError(f"video.pos_embed: {self.pos_embed!r} is not one of ['learned', 'sincos']")
        for name in ("image_size", "patch_size", "tubelet_size", "num_frames", "in_channels",
                     "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"video.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"video.image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        check_range("video.conv_stem", self.conv_stem, 0, 1024, " channels (0 = no convolutional stem)")
        if self.conv_stem and (self.patch_size % ConvStem.STRIDE or self.conv_stem % 2):
            raise ConfigError(f"video.conv_stem={self.conv_stem} needs an even width and patch_size a multiple of "
                              f"{ConvStem.STRIDE} (the stem downsamples by {ConvStem.STRIDE}); got patch_size={self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ConfigError(f"video.num_frames {self.num_frames} is not divisible by tubelet_size {self.tubelet_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"video.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        check_range("video.hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_range("video.num_layers", self.num_layers, 1, MAX_LAYERS)
        check_range("video.in_channels", self.in_channels, 1, 16)
        check_range("video.num_frames", self.num_frames, 1, MAX_FRAMES, " frames per clip")
        tokens = (self.image_size // self.patch_size) ** 2 * (self.num_frames // self.tubelet_size)
        if tokens > MAX_VIDEO_TOKENS:
            raise ConfigError(f"video.image_size={self.image_size} with patch_size={self.patch_size}, num_frames="
                              f"{self.num_frames} and tubelet_size={self.tubelet_size} makes {tokens} tokens per clip; "
                              f"at most {MAX_VIDEO_TOKENS}: lower image_size or num_frames, or raise patch_size")
        check_range("video.mlp_ratio", self.mlp_ratio, 0.25, 64)
        check_range("video.dropout", self.dropout, 0, 0.999)
        check_range("video.layer_norm_eps", self.layer_norm_eps, 1e-12, 1)
        if not 0 <= self.fusion_layers <= self.num_layers:
            raise ConfigError(f"video.fusion_layers must be in [0, num_layers={self.num_layers}], got {self.fusion_layers}")

    @property
    def native_grid(self) -> tuple[int, int, int]:
        """(t', h', w') of the patch grid at the pre-training size; position embeddings live on it."""
        side = self.image_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoEncoderConfig:
        return from_dict(cls, data, where="video")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_videomae(cls, hf_config: Any, **overrides: Any) -> VideoEncoderConfig:
        """The evl config that reproduces a `transformers.VideoMAEConfig` (joint, sincos, no CLS).

        `use_mean_pooling=True` checkpoints have no final LayerNorm on the tokens (their `fc_norm` sits
        in the classification head, after pooling), so `final_norm` follows `not use_mean_pooling`.
        `overrides` change any field afterwards (e.g. `attention="divided"` to start a TimeSformer from
        VideoMAE weights, or `fusion_layers=6`).
        """
        image = _square(hf_config.image_size, "image_size")
        patch = _square(hf_config.patch_size, "patch_size")
        hidden = int(hf_config.hidden_size)
        act = getattr(hf_config, "hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"VideoMAE hidden_act {act!r} is not supported: evl's MLP uses exact GELU ('gelu')")
        ratio = hf_config.intermediate_size / hidden
        if int(hidden * ratio) != hf_config.intermediate_size:
            raise ConfigError(f"VideoMAE intermediate_size {hf_config.intermediate_size} is not expressible as "
                              f"hidden_size {hidden} × mlp_ratio")
        qv_bias = getattr(hf_config, "qv_bias", getattr(hf_config, "qkv_bias", True))
        values: dict[str, Any] = dict(
            image_size=image, patch_size=patch, tubelet_size=int(hf_config.tubelet_size),
            num_frames=int(hf_config.num_frames), in_channels=int(hf_config.num_channels),
            hidden_size=hidden, num_layers=int(hf_config.num_hidden_layers),
            num_heads=int(hf_config.num_attention_heads), mlp_ratio=ratio, qkv_bias=bool(qv_bias),
            layer_norm_eps=float(hf_config.layer_norm_eps), attention="joint", use_cls_token=False,
            pos_embed="sincos", final_norm=not bool(getattr(hf_config, "use_mean_pooling", True)),
        )
        values.update(overrides)
        return cls(**values)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"VideoMAE {name} {tuple(value)} is not square; evl's encoder expects square patches/images")
        return int(value[0])
    return int(value)


# ------------------------------------------------------------------------------------------------ blocks


class VideoBlock(nn.Module):
    """One pre-LN video transformer block, joint or divided, with optional gated cross-attention.

    joint:   x + attn(norm1(x))                               [all tokens]
    divided: x + time_attn(time_norm(x))                      [patches, across slots at each rank]
             x + attn(norm1(x))                               [within each slot, CLS replicated]
    both:    x + gate·cross_attn(LN(x), context)              [top fusion blocks, only if context given]
             x + mlp(norm2(x))

    Divided layout and CLS (TimeSformer's choice): the CLS token skips time attention; for space
    attention it is copied into every temporal slot, attends with that slot's patches, and the CLS
    update is the mean of the per-slot updates over *valid* slots. Time attention runs across slots
    between tokens of the same rank inside their slot — the same spatial location when all patches are
    kept or when the same positions are kept in every slot (tube masking); with per-slot token dropping
    it pairs the j-th kept token of each slot, whose position embeddings still tell them apart.

    The time attention's output projection starts at zero, so a divided block begins as a per-frame
    image-ViT block and weights from an image/joint checkpoint are a sound initialisation.
    """

    def __init__(self, cfg: VideoEncoderConfig, fusion: bool = False):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.divided = cfg.attention == "divided"
        self.has_cls = cfg.use_cls_token
        self.grad_checkpointing = cfg.grad_checkpointing
        if self.divided:
            self.time_norm = nn.LayerNorm(d, eps=eps)
            self.time_attn = MultiHeadAttention(d, cfg.num_heads, qkv_bias=cfg.qkv_bias, dropout=cfg.dropout)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = MultiHeadAttention(d, cfg.num_heads, qkv_bias=cfg.qkv_bias, dropout=cfg.dropout)
        self.cross_attn = GatedCrossAttention(d, cfg.context_dim or d, cfg.num_heads, eps=eps) if fusion else None
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, int(d * cfg.mlp_ratio), dropout=cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, time_slots: int | None = None) -> torch.Tensor:
        """x (B, C+K, D) → same shape. `time_slots` (= frames // tubelet) is required by the divided layout.

        `context=None` skips the cross-attention (dual mode); blocks without fusion ignore `context`.
        """
        if self.divided and time_slots is None:
            raise ValueError("divided attention needs time_slots (the number of temporal tubelet slots) "
                             "in every block call; run blocks through VideoEncoder.run_blocks")
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, key_mask, context, context_mask, time_slots, use_reentrant=False)
        return self._forward(x, key_mask, context, context_mask, time_slots)

    def _forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, context: torch.Tensor | None,
                 context_mask: torch.Tensor | None, time_slots: int | None) -> torch.Tensor:
        if self.divided:
            x = self._divided_attention(x, key_mask, time_slots)
        else:
            x = x + self.attn(self.norm1(x), key_mask=key_mask)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(x, context, context_mask)
        return x + self.mlp(self.norm2(x))

    def _divided_attention(self, x: torch.Tensor, key_mask: torch.Tensor | None, t: int) -> torch.Tensor:
        b, n, d = x.shape
        c = 1 if self.has_cls else 0
        k = n - c
        if k % t:
            raise ValueError(f"divided attention: {k} patch tokens do not split into {t} equal temporal slots")
        s = k // t
        cls, p = x[:, :c], x[:, c:]
        pmask = key_mask[:, c:].view(b, t, s) if key_mask is not None else None

        # time: (B·S, t) sequences, one per rank inside the slot
        seq = p.view(b, t, s, d).transpose(1, 2).reshape(b * s, t, d)
        tmask = pmask.transpose(1, 2).reshape(b * s, t) if pmask is not None else None
        upd = self.time_attn(self.time_norm(seq), key_mask=tmask)
        p = p + upd.view(b, s, t, d).transpose(1, 2).reshape(b, k, d)

        # space: (B·t, C+S) sequences, one per slot, CLS copied into each
        seq = p.reshape(b * t, s, d)
        smask = pmask.reshape(b * t, s) if pmask is not None else None
        if c:
            seq = torch.cat([cls.repeat_interleave(t, dim=0), seq], dim=1)
            if smask is not None:
                smask = torch.cat([smask.new_ones(b * t, 1), smask], dim=1)
        upd = self.attn(self.norm1(seq), key_mask=smask)
        p = p + upd[:, c:].reshape(b, k, d)
        if not c:
            return p
        cls_upd = upd[:, 0].view(b, t, d)
        if pmask is None:
            cls_upd = cls_upd.mean(dim=1, keepdim=True)
        else:
            slot_valid = pmask.any(dim=2)
            slot_valid = slot_valid | ~slot_valid.any(dim=1, keepdim=True)
            w = slot_valid.to(x.dtype)[..., None]
            cls_upd = (cls_upd * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
        return torch.cat([cls + cls_upd, p], dim=1)


# ----------------------------------------------------------------------------------------------- encoder


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"): each frame
    goes through two 3×3 stride-2 convolutions before the tubelet projection, so edge and corner detectors
    are shared across positions and an object's shape reads the same wherever it falls on the patch grid.
    (B, T, C, H, W) → (B, T, width, H/4, W/4); frames where `frame_mask` is False come out as zeros."""

    STRIDE = 4

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = frames.shape[:2]
        # channels-last in and out: oneDNN's fast layout for these narrow convolutions (the stem's forward +
        # backward ~30% faster on a 2-core CPU, fp32 and bf16); the tubelet projection reads it as it is
        x = frames.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        x = x.view(b, t, *x.shape[1:])
        return x if frame_mask is None else x * frame_mask[:, :, None, None, None].to(x.dtype)


class VideoEncoder(nn.Module):
    """Space-time ViT over (B, T, C, H, W) float frames; see the module docstring for the layouts."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        p, t = cfg.patch_size, cfg.tubelet_size
        self.stem = ConvStem(cfg.in_channels, cfg.conv_stem) if cfg.conv_stem else None
        if self.stem is not None:
            p //= ConvStem.STRIDE
        self.patch_embed = nn.Conv3d(cfg.conv_stem or cfg.in_channels, d, kernel_size=(t, p, p), stride=(t, p, p))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls_token else None
        # replaces masked patches in masked video modelling; zero-initialised (SimMIM), so it draws
        # nothing from the RNG and a model that never masks is initialised exactly as without it
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VideoBlock(cfg, fusion=i >= cfg.first_fused_layer) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT init (trunc-normal 0.02, zero biases); zero time-attention output (see VideoBlock)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for blk in self.blocks:
            if blk.divided:
                nn.init.zeros_(blk.time_attn.proj.weight)
                nn.init.zeros_(blk.time_attn.proj.bias)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (saves memory at ~30% more compute), training only."""
        self.cfg.grad_checkpointing = enabled
        for blk in self.blocks:
            blk.grad_checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        """Parameters excluded from weight decay (as timm and VideoMAE do): decaying the CLS and mask
        tokens and the position tables pulls them towards 0 instead of regularising anything."""
        names = {"mask_token"} | ({"cls_token"} if self.cls_token is not None else set())
        return names | {f"pos_embed.{n}" for n, _ in self.pos_embed.named_parameters()}

    # ---- pieces (public for lockstep fusion) ----

    def check_frames(self, frames: torch.Tensor) -> tuple[int, int, int]:
        """Validate (B, T, C, H, W) float frames; return the patch grid (t', h', w')."""
        cfg = self.cfg
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, T, C, H, W); got a tensor of shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise ValueError(f"frames must be a float tensor (normalised pixels); got dtype {frames.dtype} — "
                             "apply the video transforms (or .float() and normalise) first")
        _, t, c, h, w = frames.shape
        if c != cfg.in_channels:
            raise ValueError(f"frames have {c} channels at dim 2; expected in_channels={cfg.in_channels} "
                             f"(layout is (B, T, C, H, W), got shape {tuple(frames.shape)})")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"frame size {h}x{w} is not divisible by patch_size {cfg.patch_size}; "
                             "resize/crop to a multiple of the patch size")
        if t % cfg.tubelet_size:
            raise ValueError(f"{t} frames is not a multiple of tubelet_size {cfg.tubelet_size}; "
                             "sample a multiple or pad and mark padding with frame_mask")
        return t // cfg.tubelet_size, h // cfg.patch_size, w // cfg.patch_size

    def embed(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None,
              keep_index: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> VideoTokens:
        """Frames → the block loop's starting `VideoTokens`.

        Padded frames are zeroed before the tubelet conv, so a tubelet that mixes real and padded
        frames sees only its real frames; a tubelet is valid if any of its frames is. `hidden` (B, N)
        bool, True = hidden: those patches are replaced by the learnable mask token (positions are
        still added, so the model knows *where* it has to fill in). `keep_index` (B, K) keeps only
        those patches. Pass `frame_mask=None` when nothing is padded (the Collator does): any mask
        makes attention build a key mask and leave SDPA's unmasked fast path.
        """
        grid = self.check_frames(frames)
        b, t = frames.shape[:2]
        n = grid[0] * grid[1] * grid[2]
        if frame_mask is not None:
            frame_mask = self._check_frame_mask(frame_mask, b, t, frames.device)
            frames = frames * frame_mask[:, :, None, None, None].to(frames.dtype)
        valid = None
        if frame_mask is not None:
            slot_valid = frame_mask.view(b, grid[0], self.cfg.tubelet_size).any(dim=2)
            valid = slot_valid[:, :, None].expand(b, grid[0], grid[1] * grid[2]).reshape(b, -1)
        if self.stem is not None:   # runs on whole frames: with keep_index only the projection is saved
            frames = self.stem(frames, frame_mask)
        if keep_index is not None:
            # embed only the kept patches: the tubelet conv as a matmul on them (MAE's saving starts here)
            keep_index = self._check_keep_index(keep_index, b, grid, frames.device)
            x = self._embed_patches(frames, keep_index)
            if hidden is not None:
                kept_hidden = self._check_hidden(hidden, b, n, x.device).gather(1, keep_index)
                x = torch.where(kept_hidden[..., None], self.mask_token.to(x.dtype), x)
            x = x + self.pos_embed(grid).to(x.dtype)[keep_index]
            positions = keep_index
            valid = valid.gather(1, keep_index) if valid is not None else None
        else:
            x = self.patch_embed(frames.transpose(1, 2)).flatten(2).transpose(1, 2)
            if hidden is not None:
                hidden = self._check_hidden(hidden, b, n, x.device)
                x = torch.where(hidden[..., None], self.mask_token.to(x.dtype), x)
            x = x + self.pos_embed(grid).to(x.dtype)[None]
            positions = torch.arange(n, device=x.device).expand(b, n)
        prefix = 0
        if self.cls_token is not None:
            prefix = 1
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
            if valid is not None:
                valid = torch.cat([valid.new_ones(b, 1), valid], dim=1)
        return VideoTokens(x, valid, positions, grid, grid[0], prefix)

    def _embed_patches(self, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The tubelet conv applied to patches `index` (B, K) only: (B, K, D), equal to the conv's output
        at those tokens (its kernel read in `patchify`'s (t, p, p, C) order)."""
        from evl.models.masking import patchify

        conv = self.patch_embed
        patches = patchify(frames, conv.kernel_size[1], self.cfg.tubelet_size)
        patches = patches.gather(1, index[..., None].expand(-1, -1, patches.shape[-1]))
        weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.weight.shape[0], -1)
        return F.linear(patches, weight, conv.bias)

    def run_blocks(self, tokens: VideoTokens, start: int = 0, stop: int | None = None,
                   context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                   hooks: Mapping[int, Sequence[TokenHook]] | None = None) -> VideoTokens:
        """Blocks `start` .. `stop`-1 — the one loop over video blocks in evl.

        `hooks[i]` run before block i; `hooks[num_layers]` after the last block (only in the call
        that ends there), so running the tower in pieces (as backbone fusion does) applies each hook
        exactly once. `context` reaches the gated cross-attention of the fused blocks.
        """
        last = len(self.blocks)
        stop = last if stop is None else stop
        if not 0 <= start <= stop <= last:
            raise ValueError(f"run_blocks: need 0 <= start <= stop <= {last}, got start={start}, stop={stop}")
        for i in range(start, stop):
            tokens = apply_hooks(tokens, hooks, i)
            x = self.blocks[i](tokens.x, tokens.key_mask, context=context, context_mask=context_mask,
                               time_slots=tokens.time_slots)
            tokens = tokens.replace(x=x)
        if stop == last:
            tokens = apply_hooks(tokens, hooks, last)
        return tokens

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm (identity when cfg.final_norm is False, as VideoMAE with mean pooling)."""
        return self.norm(x)

    def _check_frame_mask(self, mask: torch.Tensor, b: int, t: int, device: torch.device) -> torch.Tensor:
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"frame_mask must be (B, T) = ({b}, {t}); got {tuple(mask.shape)}")
        return mask.to(device=device, dtype=torch.bool)

    def _check_hidden(self, hidden: torch.Tensor, b: int, n: int, device: torch.device) -> torch.Tensor:
        if tuple(hidden.shape) != (b, n):
            raise ValueError(f"hidden must be (B, N) = ({b}, {n}) over the patch grid; got {tuple(hidden.shape)}")
        if hidden.dtype != torch.bool:
            raise ValueError(f"hidden must be a bool tensor (True = replaced by the mask token); got dtype {hidden.dtype}")
        return hidden.to(device)

    def _check_keep_index(self, keep: torch.Tensor, b: int, grid: tuple[int, int, int],
                          device: torch.device) -> torch.Tensor:
        t, h, w = grid
        n = t * h * w
        if keep.dim() != 2 or keep.shape[0] != b:
            raise ValueError(f"keep_index must be (B, K) = ({b}, K); got {tuple(keep.shape)}")
        if keep.is_floating_point() or keep.dtype == torch.bool:
            raise ValueError(f"keep_index must hold integer token indices (long); got dtype {keep.dtype}")
        keep = keep.to(device=device, dtype=torch.long)
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n):
            raise ValueError(f"keep_index values must lie in [0, {n}) for a {t}x{h}x{w} patch grid; "
                             f"got range [{int(keep.min())}, {int(keep.max())}]")
        if self.cfg.attention == "divided":
            k = keep.shape[1]
            if k % t:
                raise ValueError(f"divided attention: keep_index keeps {k} tokens, not a multiple of the "
                                 f"{t} temporal slots; keep the same number of tokens in every slot")
            expected = torch.arange(t, device=device).repeat_interleave(k // t)
            if not torch.equal(keep // (h * w), expected.expand(b, -1)):
                raise ValueError(f"divided attention: keep_index must keep {k // t} tokens in each of the {t} "
                                 "temporal slots, listed slot by slot (sort each row: keep_index.sort(dim=1))")
        return keep

    # ---- whole tower ----

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None,
                keep_index: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                hooks: Mapping[int, Sequence[TokenHook]] | None = None) -> VideoEncoderOutput:
        tokens = self.run_blocks(self.embed(frames, frame_mask, keep_index, hidden), hooks=hooks)
        out = self.finalize(tokens.x)
        token_mask = tokens.key_mask if tokens.key_mask is not None else out.new_ones(out.shape[:2], dtype=torch.bool)
        return VideoEncoderOutput(tokens=out, cls=self.pool(out, tokens.key_mask), token_mask=token_mask,
                                  grid=tokens.grid, positions=tokens.positions)

    def pool(self, tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """CLS token if there is one, else the mean of the valid tokens (VideoMAE's mean pooling)."""
        if self.cls_token is not None:
            return tokens[:, 0]
        if token_mask is None:
            return tokens.mean(dim=1)
        w = token_mask.to(tokens.dtype)[..., None]
        return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
