"""The video MAE decoder (VideoMAE / SMAUG): predicts the pixels of the masked tubelets.

The encoder saw only the visible patches (and token hooks may have dropped or fused some of those).
The decoder projects the encoder's tokens to its own width, puts each surviving patch token back at
its place in the full (t', h', w') grid, fills every other place with a learned mask token, adds
fixed sinusoidal positions (VideoMAE's table), and runs a few narrow transformer blocks over the
prefix tokens (CLS, fused tokens) and the whole grid. A linear head maps the masked places only to
their t·p·p·C pixel values. VideoMAE's defaults: 4 blocks at half the encoder's width.
"""

from __future__ import annotations

import torch
from torch import nn

from evl.models.layers import Block
from evl.models.positions import videomae_sincos_table


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, patch_dim: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by its {num_heads} heads")
        self.width = width
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int, int],
                mask: torch.Tensor, key_mask: torch.Tensor | None = None,
                grid_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions (B, M, patch_dim) for the M masked places of each row, in grid order.

        tokens (B, P+K, D): the encoder's output, P prefix tokens then K patch-side tokens;
        positions (B, K): grid index of each patch-side token, -1 for a fused token (kept as context);
        mask (B, N) bool, True = predict this place (the same count in every row);
        key_mask (B, P+K): valid encoder tokens; grid_valid (B, N): places from real (unpadded) frames.
        """
        b, n_tok, _ = tokens.shape
        k = positions.shape[1]
        p = n_tok - k
        n = grid[0] * grid[1] * grid[2]
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be (B, N) = ({b}, {n}) over the patch grid {grid}; got {tuple(mask.shape)}")
        placed = positions >= 0
        if not bool((placed == placed[:1]).all()):
            raise ValueError("every row must have its fused tokens (position -1) at the same places")
        x = self.embed(tokens)
        rows = placed[0]
        context = torch.cat([x[:, :p], x[:, p:][:, ~rows]], dim=1)
        on_grid = x[:, p:][:, rows]
        where = positions[:, rows]
        full = self.mask_token.to(x.dtype).expand(b, n, self.width).clone()
        full = full.scatter(1, where[..., None].expand(-1, -1, self.width), on_grid)
        table = videomae_sincos_table(n, self.width).to(device=x.device, dtype=x.dtype)
        seq = torch.cat([context, full + table[None]], dim=1)
        attend = None
        if key_mask is not None or grid_valid is not None:
            ctx_valid = (torch.ones(b, context.shape[1], dtype=torch.bool, device=x.device) if key_mask is None
                         else torch.cat([key_mask[:, :p], key_mask[:, p:][:, ~rows]], dim=1))
            gv = torch.ones(b, n, dtype=torch.bool, device=x.device) if grid_valid is None else grid_valid
            attend = torch.cat([ctx_valid, gv], dim=1)
        for blk in self.blocks:
            seq = blk(seq, attend)
        out = seq[:, context.shape[1]:]
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"mask rows hide different numbers of patches ({counts.tolist()}); the decoder "
                             "predicts the same count in every row")
        idx = mask.nonzero()[:, 1].view(b, int(counts[0]))
        out = out.gather(1, idx[..., None].expand(-1, -1, self.width))
        return self.head(self.norm(out))
