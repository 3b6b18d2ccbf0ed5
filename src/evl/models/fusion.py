"""Cross-modal fusion, both kinds.

1. `CrossModalEncoder` (E-ViLM / ALBEF style): N extra layers on top of the text tower; text tokens
   self-attend, then attend to the video tokens, then an MLP. The towers stay untouched.
2. `BackboneFusion` (EgoVLPv2, `evl.techniques.egovlpv2.fusion`): the towers' own top layers carry
   gated cross-attention (see `VideoBlock` / `TextLayer`); it drives both towers through those layers
   in lockstep. Without context the same layers are the plain towers (dual mode).

Both have the same interface — `fused_dim` and `fuse(model, video, text) -> FusionOutput` — and
`FUSIONS` maps `fusion.kind` to the class, so the model holds one `fusion` module and never branches
on the kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evl.config import MAX_LAYERS, MAX_WIDTH, check_range
from evl.models.features import FusionOutput, TextFeatures, VideoFeatures
from evl.models.layers import MLP, MultiHeadAttention
from evl.techniques.egovlpv2.fusion import BackboneFusion


@dataclass
class FusionConfig:
    """`kind`: "encoder" (separate cross-modal encoder), "backbone" (EgoVLPv2) or "none" (dual only).

    `num_layers`: cross-modal layers (encoder) or fused top layers in *each* tower (backbone).
    `num_heads` / `mlp_ratio` apply to the separate encoder only (backbone fusion uses the towers').
    `dual_residual`: the pair representation the VTM / QA heads read also gets a learned projection of
    the two dual embeddings' element-wise product (`VideoLanguageModel.fuse`), so those heads start from
    the alignment VTC trained instead of from fusion layers that a short fine-tune must train from nothing.
    """

    kind: str = "encoder"          # a key of FUSIONS
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dual_residual: bool = False

    @property
    def tower_layers(self) -> int:
        """Top layers of each tower that carry gated cross-attention (fusions that live in the towers)."""
        return self.num_layers if getattr(FUSIONS.get(self.kind), "in_towers", False) else 0

    def __post_init__(self) -> None:
        if self.kind not in FUSIONS:
            raise ValueError(f"fusion.kind: {self.kind!r} is not one of {list(FUSIONS)}")
        if self.kind != "none" and self.num_layers < 1:
            raise ValueError(f"fusion.num_layers must be >= 1 for fusion kind {self.kind!r}; got {self.num_layers}")
        check_range("fusion.num_layers", self.num_layers, 0, MAX_LAYERS)
        check_range("fusion.num_heads", self.num_heads, 1, MAX_WIDTH)
        check_range("fusion.mlp_ratio", self.mlp_ratio, 0.25, 64)
        if self.dual_residual and self.kind == "none":
            raise ValueError("fusion.dual_residual needs a fusion (kind 'encoder' or 'backbone'); kind is 'none'")


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

    def __init__(self, text_dim: int, video_dim: int, cfg: FusionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalLayer(text_dim, video_dim, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(text_dim)
        self.fused_dim = text_dim

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            text = layer(text, text_mask, video, video_mask)
        return self.norm(text)

    def fuse(self, model: nn.Module, video: VideoFeatures, text: TextFeatures) -> FusionOutput:
        t = self(text.tokens, text.attention_mask, video.tokens, video.token_mask)
        return FusionOutput(text_tokens=t, pooled=t[:, 0])


# the one list of fusion kinds; `backbone` is EgoVLPv2's (evl.techniques.egovlpv2)
FUSIONS: dict[str, type[nn.Module] | None] = {"encoder": CrossModalEncoder, "backbone": BackboneFusion, "none": None}
