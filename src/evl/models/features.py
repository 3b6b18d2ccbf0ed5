"""Typed outputs of the model's paths: what the dual encoder computes and the fusion path reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from evl.models.tokens import TokenHook, VideoTokens


@dataclass
class VideoFeatures:
    """One batch of clips through the video tower (dual mode).

    emb: (B, E) L2-normalised embedding. tokens: (B, N, Dv) final tokens. token_mask: (B, N) bool, or
    None when every token is real. lower: the token state entering the fused top blocks (backbone
    fusion restarts from it instead of re-running the lower blocks). positions / grid: which patch of
    the (t', h', w') grid each token came from (see `VideoTokens`). hooks: the token operations this
    pass ran, so the fusion pass runs the same ones.
    """

    emb: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor | None
    lower: VideoTokens | None = None
    positions: torch.Tensor | None = None
    grid: tuple[int, int, int] = (0, 0, 0)
    hooks: Mapping[int, Sequence[TokenHook]] | None = field(default=None, repr=False)

    def select(self, index: torch.Tensor) -> VideoFeatures:
        """Rows `index` (a clip may appear several times, e.g. the pairs of a matching loss)."""
        return VideoFeatures(self.emb[index], self.tokens[index],
                             None if self.token_mask is None else self.token_mask[index],
                             None if self.lower is None else self.lower.select(index),
                             None if self.positions is None else self.positions[index], self.grid, self.hooks)

    def to(self, device: torch.device | str) -> VideoFeatures:
        return VideoFeatures(self.emb.to(device), self.tokens.to(device),
                             None if self.token_mask is None else self.token_mask.to(device),
                             None if self.lower is None else self.lower.to(device),
                             None if self.positions is None else self.positions.to(device), self.grid, self.hooks)

    def embeddings_only(self) -> VideoFeatures:
        """Just the embedding (what a dual-encoder gallery keeps; tokens are what re-ranking needs)."""
        return VideoFeatures(self.emb, self.emb[:, :0], None, grid=self.grid)

    @staticmethod
    def cat(parts: Sequence[VideoFeatures]) -> VideoFeatures:
        """Batches joined along the batch axis (a part without a token mask is all-valid)."""
        first = parts[0]
        masks = [p.token_mask for p in parts]
        token_mask = None
        if any(m is not None for m in masks):
            token_mask = torch.cat([m if m is not None else torch.ones(p.tokens.shape[:2], dtype=torch.bool,
                                                                       device=p.tokens.device)
                                    for m, p in zip(masks, parts, strict=True)])
        return VideoFeatures(torch.cat([p.emb for p in parts]), torch.cat([p.tokens for p in parts]), token_mask,
                             None if first.lower is None else VideoTokens.cat([p.lower for p in parts]),
                             None if first.positions is None else torch.cat([p.positions for p in parts]),
                             first.grid, first.hooks)


@dataclass
class TextFeatures:
    emb: torch.Tensor             # (B, E) L2-normalised
    tokens: torch.Tensor          # (B, L, Dt)
    attention_mask: torch.Tensor  # (B, L)
    lower: torch.Tensor | None = None   # hidden states entering the fused layers (backbone fusion)

    def select(self, index: torch.Tensor) -> TextFeatures:
        return TextFeatures(self.emb[index], self.tokens[index], self.attention_mask[index],
                            None if self.lower is None else self.lower[index])

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(self.emb.to(device), self.tokens.to(device), self.attention_mask.to(device),
                            None if self.lower is None else self.lower.to(device))

    def embeddings_only(self) -> TextFeatures:
        return TextFeatures(self.emb, self.emb[:, :0], self.attention_mask[:, :0])

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        """Batches joined along the batch axis, right-padding the token axis (lengths differ)."""
        return TextFeatures(torch.cat([p.emb for p in parts]), _pad_cat([p.tokens for p in parts]),
                            _pad_cat([p.attention_mask for p in parts]),
                            None if parts[0].lower is None else _pad_cat([p.lower for p in parts]))


def _pad_cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 with zeros (a padded position has mask 0)."""
    n = max(t.shape[1] for t in tensors)
    return torch.cat([torch.cat([t, t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))], dim=1)
                      if t.shape[1] < n else t for t in tensors])


@dataclass
class FusionOutput:
    text_tokens: torch.Tensor     # (N, L, Dt) fused text tokens (MLM reads these)
    pooled: torch.Tensor          # (N, fused_dim) pair representation (VTM / QA heads read this)
