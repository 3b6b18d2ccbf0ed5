"""The per-frame QFormer of a frame-level QA model, and VLAP's distillation map.

`QFormer` (after InstructBLIP's instruction-aware Q-Former): M learnable query tokens; in each layer
the queries and the question tokens attend to each other (one self-attention over both, so the
question steers what the queries look for), then the queries alone cross-attend to ONE frame's visual
tokens, then an MLP. It returns the M query outputs of that frame: a fixed-size summary whatever the
number of patches, which is what lets the answerer see k frames as k·M tokens.

`TokenMap` is VLAP's QFormer-Distiller map: a linear layer along the token axis (k·M → N·M) and a
LayerNorm turn the student's query outputs on k selected frames into the shape of a teacher's on all
N frames, so the two can be compared by MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evl.config import MAX_LAYERS, MAX_WIDTH, check_range
from evl.models.layers import MLP, MultiHeadAttention


@dataclass
class QFormerConfig:
    hidden_size: int = 192
    num_queries: int = 8          # InstructBLIP: 32 per frame; SynthVL frames hold 16 patches
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_queries", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"qformer.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qformer.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        check_range("qformer.hidden_size", self.hidden_size, 1, MAX_WIDTH)
        check_range("qformer.num_queries", self.num_queries, 1, 1024, " query tokens per frame")
        check_range("qformer.num_layers", self.num_layers, 1, MAX_LAYERS)
        check_range("qformer.mlp_ratio", self.mlp_ratio, 0.25, 64)


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, visual_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads, context_dim=visual_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, num_queries: int, visual: torch.Tensor,
                visual_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), key_mask=key_mask)
        q, text = x[:, :num_queries], x[:, num_queries:]
        q = q + self.cross_attn(self.norm2(q), context=visual, key_mask=visual_mask)
        x = torch.cat([q, text], dim=1)
        return x + self.mlp(self.norm3(x))


class QFormer(nn.Module):
    """(B, V, visual_dim) one frame's tokens + (B, L, d) question tokens → (B, M, d) query outputs."""

    def __init__(self, cfg: QFormerConfig, visual_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, d) * 0.02)
        self.visual_norm = nn.LayerNorm(visual_dim)
        self.layers = nn.ModuleList(QFormerLayer(d, cfg.num_heads, visual_dim, cfg.mlp_ratio)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, visual: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor,
                visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, m = visual.shape[0], self.cfg.num_queries
        x = torch.cat([self.queries.expand(b, -1, -1), question], dim=1)
        key_mask = torch.cat([question_mask.new_ones(b, m), question_mask], dim=1)
        visual = self.visual_norm(visual)
        for layer in self.layers:
            x = layer(x, key_mask, m, visual, visual_mask)
        return self.norm(x[:, :m])


class TokenMap(nn.Module):
    """(B, k·M, d) → (B, N·M, d): a linear map along the token axis, then LayerNorm over d."""

    def __init__(self, in_tokens: int, out_tokens: int, dim: int):
        super().__init__()
        self.map = nn.Linear(in_tokens, out_tokens)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.map(tokens.transpose(1, 2)).transpose(1, 2))
