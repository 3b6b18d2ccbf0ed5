"""Cross-modal fusion, both kinds.

1. `CrossModalEncoder` (E-ViLM / ALBEF style): N extra layers on top of the text tower; text tokens
   self-attend, then attend to the video tokens, then an MLP. The towers stay untouched.
2. Fusion in the backbone (EgoVLPv2): the towers' own top layers carry gated cross-attention
   (see `VideoBlock` / `TextLayer`). `run_lockstep` drives both towers through those layers together:
   each video block sees the current text tokens and each text layer the current video tokens.
   Without context the same layers are the plain towers (dual mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evl.models.layers import MLP, MultiHeadAttention


@dataclass
class FusionConfig:
    """`kind`: "encoder" (separate cross-modal encoder), "backbone" (EgoVLPv2) or "none" (dual only).

    `num_layers`: cross-modal layers (encoder) or fused top layers in *each* tower (backbone).
    `num_heads` / `mlp_ratio` apply to the separate encoder only (backbone fusion uses the towers').
    """

    kind: Literal["encoder", "backbone", "none"] = "encoder"
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.kind != "none" and self.num_layers < 1:
            raise ValueError(f"fusion.num_layers must be >= 1 for fusion kind {self.kind!r}; got {self.num_layers}")


class CrossModalLayer(nn.Module):
    """Pre-LN: x + SA(LN x); x + CA(LN x, video); x + MLP(LN x)."""

    def __init__(self, dim: int, video_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim=video_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_mask=mask)
        x = x + self.cross_attn(self.norm2(x), context=video, key_mask=video_mask)
        return x + self.mlp(self.norm3(x))


class CrossModalEncoder(nn.Module):
    """Text tokens (B, L, D) attend to video tokens (B, N, Dv) through `num_layers` layers."""

    def __init__(self, dim: int, video_dim: int, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalLayer(dim, video_dim, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            text = layer(text, text_mask, video, video_mask)
        return self.norm(text)


def run_lockstep(video_blocks: nn.ModuleList, text_layers: nn.ModuleList, v: torch.Tensor,
                 v_mask: torch.Tensor | None, t: torch.Tensor, t_mask: torch.Tensor,
                 time_slots: int, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused top layers of both towers; `fuse=False` is dual mode (no cross-attention).

    Both updates in a step read the *previous* states of the other tower, so the result does not
    depend on which tower is stepped first.
    """
    if len(video_blocks) != len(text_layers):
        raise ValueError(f"backbone fusion needs the same number of fused layers in both towers; "
                         f"got video {len(video_blocks)} and text {len(text_layers)}")
    for vb, tl in zip(video_blocks, text_layers, strict=True):
        v_ctx, t_ctx = (t, v) if fuse else (None, None)
        v_next = vb(v, v_mask, context=v_ctx, context_mask=t_mask if fuse else None, time_slots=time_slots)
        t = tl(t, t_mask, context=t_ctx, context_mask=v_mask if fuse else None)
        v = v_next
    return v, t
