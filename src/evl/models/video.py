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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evl.config import MAX_LAYERS, MAX_VIDEO_TOKENS, MAX_WIDTH, check_range, from_dict, to_dict
from evl.data import MAX_FRAMES
from evl.errors import CheckpointError, ConfigError
from evl.models.layers import MLP, GatedCrossAttention, MultiHeadAttention


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


@dataclass
class VideoEncoderOutput:
    """What the video tower returns.

    tokens: (B, 1+K, D) final-normed tokens, CLS first when the encoder has one (else (B, K, D)).
    cls: (B, D) the CLS token, or the mean of the valid tokens when the encoder has no CLS.
    token_mask: (B, 1+K) bool, True for tokens that come from at least one real (unpadded) frame.
    grid: (t', h', w') of the full patch grid before `keep_index` was applied.
    """

    tokens: torch.Tensor
    cls: torch.Tensor
    token_mask: torch.Tensor
    grid: tuple[int, int, int] = field(default=(0, 0, 0))
    positions: torch.Tensor | None = None


@dataclass
class VideoTokens:
    """The state the block loop carries: tokens plus where each one came from.

    x: (B, P+K, D) — `num_prefix` (CLS) tokens, then K patch tokens.
    key_mask: (B, P+K) bool, True = a real token; None when every token is real (no mask is built).
    positions: (B, K) long — the index of each patch token in the full grid, (slot·h' + row)·w' + col;
      dropping, merging or selecting tokens keeps this in step, so a decoder or a target knows which
      patch each surviving token is.
    grid: (t', h', w') of the input before any token was dropped.
    time_slots: temporal slots the tokens span now (divided attention splits tokens by it).
    """

    x: torch.Tensor
    key_mask: torch.Tensor | None
    positions: torch.Tensor
    grid: tuple[int, int, int]
    time_slots: int
    num_prefix: int = 0

    def replace(self, **changes: Any) -> VideoTokens:
        return dataclasses.replace(self, **changes)

    def select(self, index: torch.Tensor) -> VideoTokens:
        """Rows `index` of the batch (e.g. the pairs of a matching loss)."""
        return self.replace(x=self.x[index], positions=self.positions[index],
                            key_mask=None if self.key_mask is None else self.key_mask[index])

    def to(self, device: torch.device | str) -> VideoTokens:
        return self.replace(x=self.x.to(device), positions=self.positions.to(device),
                            key_mask=None if self.key_mask is None else self.key_mask.to(device))

    @staticmethod
    def cat(parts: Sequence[VideoTokens]) -> VideoTokens:
        """Batches of the same grid joined along the batch (a part without a key mask is all-valid)."""
        masks = [p.key_mask for p in parts]
        key_mask = None
        if any(m is not None for m in masks):
            key_mask = torch.cat([m if m is not None else torch.ones(p.x.shape[:2], dtype=torch.bool, device=p.x.device)
                                  for m, p in zip(masks, parts, strict=True)])
        return parts[0].replace(x=torch.cat([p.x for p in parts]), key_mask=key_mask,
                                positions=torch.cat([p.positions for p in parts]))


TokenHook = Callable[[VideoTokens], VideoTokens]


# ----------------------------------------------------------------------------------- position embeddings


def videomae_sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1-D sinusoid table over the flattened (t', h', w') grid, (num_positions, dim).

    Computed in float64 and rounded once, as VideoMAE does with numpy, so imported weights match exactly.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)[None, :]
    table = angles.clone()
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)


def _resize_3d(table: torch.Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> torch.Tensor:
    """(t·h·w, D) table on grid `src` → (t'·h'·w', D) on grid `dst`, trilinear (identity when equal).

    This is how VideoMAE-v2 / UMT fine-tune at other frame counts and resolutions: recomputing the flat
    1-D sinusoid on a new grid would silently reassign positions (row length changes), interpolating
    keeps each token's position in the clip.
    """
    if src == dst:
        return table
    d = table.shape[-1]
    grid = table.reshape(1, *src, d).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid.float(), size=dst, mode="trilinear", align_corners=False).to(table.dtype)
    return grid.permute(0, 2, 3, 4, 1).reshape(-1, d)


class PositionEmbedding(nn.Module):
    """Space-time position embeddings that follow the input grid.

    learned: factorised — a temporal table (t0, D) plus a spatial table (h0·w0, D), each interpolated
    on its own axis (temporal linear, spatial bicubic), so more frames than pre-training or a larger
    image "just work" and the spatial table can come from an image ViT.
    sincos: VideoMAE's fixed table, trilinearly interpolated off the native grid (see `_resize_3d`).
    At the native grid both are returned unchanged (interpolation is the identity).
    """

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.kind = cfg.pos_embed
        self.native = cfg.native_grid
        t0, h0, w0 = self.native
        d = cfg.hidden_size
        if self.kind == "learned":
            self.temporal = nn.Parameter(torch.zeros(t0, d))
            self.spatial = nn.Parameter(torch.zeros(h0 * w0, d))
            nn.init.trunc_normal_(self.temporal, std=0.02)
            nn.init.trunc_normal_(self.spatial, std=0.02)
        else:
            self.register_buffer("table", videomae_sincos_table(t0 * h0 * w0, d), persistent=False)

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(t'·h'·w', D) embedding for the patch grid `grid`, in the patch order of the tubelet conv."""
        if self.kind == "sincos":
            return _resize_3d(self.table, self.native, grid)
        t, h, w = grid
        t0, h0, w0 = self.native
        temporal = self.temporal
        if t != t0:
            temporal = F.interpolate(temporal.T[None], size=t, mode="linear", align_corners=False)[0].T
        spatial = self.spatial
        if (h, w) != (h0, w0):
            img = spatial.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
            img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
            spatial = img.permute(0, 2, 3, 1).reshape(h * w, -1)
        return (temporal[:, None, :] + spatial[None, :, :]).reshape(t * h * w, -1)


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


class VideoEncoder(nn.Module):
    """Space-time ViT over (B, T, C, H, W) float frames; see the module docstring for the layouts."""

    def __init__(self, cfg: VideoEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        p, t = cfg.patch_size, cfg.tubelet_size
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=(t, p, p), stride=(t, p, p))
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
        patches = patchify(frames, self.cfg.patch_size, self.cfg.tubelet_size)
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


def apply_hooks(tokens: VideoTokens, hooks: Mapping[int, Sequence[TokenHook]] | None, index: int) -> VideoTokens:
    """Run the hooks registered at `index` (before block `index`; `num_layers` = after the last)."""
    for hook in (hooks or {}).get(index, ()):
        tokens = hook(tokens)
        if not isinstance(tokens, VideoTokens):
            raise TypeError(f"video token hook {hook!r} (before block {index}) must return VideoTokens, "
                            f"got {type(tokens).__name__}")
    return tokens


# ------------------------------------------------------------------------------------ VideoMAE import

# HF VideoMAE keys (after stripping "videomae.") → evl; per-layer suffixes under encoder.layer.{i}.
_HF_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
# Original MCG-NJU VideoMAE keys (after stripping "encoder."), per block under blocks.{i}.
_ORIG_LAYER = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2"}
# Heads and pre-training parts that are not the encoder: reported, never loaded.
_IGNORED_PREFIXES = ("fc_norm.", "classifier.", "head.", "decoder.", "encoder_to_decoder.", "mask_token",
                     "pos_embed", "embeddings.position_embeddings")


@dataclass
class VideoMAELoadReport:
    """What `load_videomae_state_dict` did: evl keys left at init, checkpoint keys not used (heads)."""

    missing: list[str]
    ignored: list[str]


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefixes: HF `videomae.` (task models), original pre-training `encoder.`."""
    if any(k.startswith("videomae.") for k in state_dict):
        state_dict = {k.removeprefix("videomae."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.blocks.") for k in state_dict):
        state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items()}
    return state_dict


def videomae_to_evl(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a HF (`VideoMAEModel`/`...ForVideoClassification`/`...ForPreTraining`) or original VideoMAE
    state dict to evl key names. Returns (mapped, ignored keys). Unknown keys raise CheckpointError.

    VideoMAE has no key bias: q and v biases (HF `query.bias`/`value.bias`, or older `q_bias`/`v_bias`)
    are fused into evl's qkv bias with a zero k part, which is the same function.
    """
    sd = _strip_prefix(dict(state_dict))
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key.startswith("embeddings.patch_embeddings.projection.") or key.startswith("patch_embed.proj."):
            out[f"patch_embed.{parts[-1]}"] = value
        elif key in ("layernorm.weight", "layernorm.bias", "norm.weight", "norm.bias"):
            out[f"norm.{parts[-1]}"] = value
        elif key.startswith("encoder.layer.") or key.startswith("blocks."):
            hf = key.startswith("encoder.layer.")
            idx = int(parts[2] if hf else parts[1])
            sub = ".".join(parts[3:] if hf else parts[2:])
            if not _map_layer_key(out, qkv.setdefault(idx, {}), idx, sub, value, hf):
                raise CheckpointError(f"VideoMAE checkpoint key {key!r} is not recognised (layer {idx}, {sub!r})")
        elif key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
        else:
            raise CheckpointError(f"VideoMAE checkpoint key {key!r} is not part of a VideoMAE encoder; "
                                  "pass the encoder's state dict (or VideoMAEModel/…ForVideoClassification)")
    for idx, parts_ in qkv.items():
        _fuse_qkv(out, idx, parts_)
    return out, ignored


def _map_layer_key(out: dict[str, torch.Tensor], qkv: dict[str, torch.Tensor], idx: int, sub: str,
                   value: torch.Tensor, hf: bool) -> bool:
    """One per-layer key; q/k/v pieces are collected in `qkv` and fused later. False = unknown key."""
    if hf and sub.startswith("attention.attention."):
        name = sub.removeprefix("attention.attention.")
        aliases = {"query.weight": "qw", "key.weight": "kw", "value.weight": "vw", "query.bias": "qb",
                   "value.bias": "vb", "q_bias": "qb", "v_bias": "vb", "key.bias": "kb"}
        if name not in aliases:
            return False
        qkv[aliases[name]] = value
        return True
    if not hf and sub in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.qkv.bias"):
        qkv[{"attn.qkv.weight": "w", "attn.q_bias": "qb", "attn.v_bias": "vb", "attn.qkv.bias": "b"}[sub]] = value
        return True
    table = _HF_LAYER if hf else _ORIG_LAYER
    for src, dst in table.items():
        if sub.startswith(src + "."):
            out[f"blocks.{idx}.{dst}.{sub.removeprefix(src + '.')}"] = value
            return True
    return False


def _fuse_qkv(out: dict[str, torch.Tensor], idx: int, p: dict[str, torch.Tensor]) -> None:
    weight = p["w"] if "w" in p else torch.cat([p["qw"], p["kw"], p["vw"]], dim=0)
    out[f"blocks.{idx}.attn.qkv.weight"] = weight
    if "b" in p:
        out[f"blocks.{idx}.attn.qkv.bias"] = p["b"]
    elif "qb" in p or "vb" in p:
        dim = weight.shape[0] // 3
        zeros = weight.new_zeros(dim)
        out[f"blocks.{idx}.attn.qkv.bias"] = torch.cat([p.get("qb", zeros), p.get("kb", zeros), p.get("vb", zeros)])


def load_videomae_state_dict(encoder: VideoEncoder, state_dict: dict[str, torch.Tensor],
                             strict: bool = True) -> VideoMAELoadReport:
    """Load VideoMAE weights (HF or original layout) into `encoder` (build it with `from_videomae`).

    strict=True: every evl parameter must come from the checkpoint — an encoder with parts VideoMAE
    lacks (CLS token, learned positions, divided time attention, fusion) then raises CheckpointError
    listing them; pass strict=False to keep those at their initialisation (e.g. a TimeSformer or a
    fusion tower started from VideoMAE). Shape mismatches always raise.
    """
    mapped, ignored = videomae_to_evl(state_dict)
    own = encoder.state_dict()
    if "blocks.0.attn.qkv.bias" in own and "blocks.0.attn.qkv.weight" in mapped:
        for i in range(len(encoder.blocks)):
            key = f"blocks.{i}.attn.qkv.bias"
            if key not in mapped and f"blocks.{i}.attn.qkv.weight" in mapped:
                mapped[key] = torch.zeros_like(own[key])  # checkpoint without q/v bias (qv_bias=False)
    unexpected = sorted(set(mapped) - set(own))
    if unexpected:
        raise CheckpointError(f"VideoMAE weights do not fit this encoder; unexpected keys: {unexpected[:8]}"
                              f"{' …' if len(unexpected) > 8 else ''} — build it with "
                              "VideoEncoderConfig.from_videomae(hf_config) (final_norm, qkv_bias, num_layers)")
    for key, value in mapped.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(f"VideoMAE key for {key!r} has shape {tuple(value.shape)}, encoder expects "
                                  f"{tuple(own[key].shape)}; build the encoder with VideoEncoderConfig.from_videomae")
    # the mask token is evl's own (masked video modelling); VideoMAE's encoder has none
    missing = sorted(set(own) - set(mapped) - {"mask_token"})
    if missing and strict:
        raise CheckpointError(f"VideoMAE checkpoint lacks {len(missing)} encoder keys: {missing[:8]}"
                              f"{' …' if len(missing) > 8 else ''}; use strict=False to keep them at init")
    encoder.load_state_dict(mapped, strict=False)
    return VideoMAELoadReport(missing=missing, ignored=sorted(ignored))

