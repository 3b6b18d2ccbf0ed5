"""Picking k of N time positions: the `Selection` type and top-k selection in temporal order.

Shared by the techniques that keep a few frames: SMAUG's text-guided frame selection keeps the
top-scored time slots of the video tower, VLAP's SeViLA-style localizer the top-scored candidate frames
(VLAP's own Frame-Prompter, one pick per segment, is in `evl.techniques.vlap.frame_prompter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    index: torch.Tensor                 # (B, k) long, candidate indices in temporal order
    mask: torch.Tensor                  # (B, k) bool, real picks
    weights: torch.Tensor | None = None  # (B, k, N) straight-through one-hot (training), else None


def real_frames(frame_mask: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    return torch.ones(b, n, dtype=torch.bool, device=device) if frame_mask is None else frame_mask.to(torch.bool)


def topk_pick(scores: torch.Tensor, frame_mask: torch.Tensor | None, k: int) -> Selection:
    """The k highest-scored real frames, in temporal order (fewer real picks when fewer exist)."""
    b, n = scores.shape
    real = real_frames(frame_mask, b, n, scores.device)
    kk = min(k, n)
    top = scores.float().masked_fill(~real, float("-inf")).topk(kk, dim=1).indices
    picked_real = torch.gather(real, 1, top)
    # padding (if picked because too few real frames) sorts last, real picks in temporal order
    index = torch.where(picked_real, top, top + n).sort(dim=1).values
    mask = index < n
    index = torch.where(mask, index, torch.zeros_like(index))
    if kk < k:
        index = torch.cat([index, index.new_zeros(b, k - kk)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, k - kk)], dim=1)
    return Selection(index, mask)
