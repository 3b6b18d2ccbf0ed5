"""Position embeddings of the video tower's (t', h', w') token grid: learned, or VideoMAE's fixed
sine-cosine table, each resized (trilinear) when a clip's grid differs from the native one."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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

    def __init__(self, cfg: Any):   # a VideoEncoderConfig: pos_embed, native_grid, hidden_size
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
