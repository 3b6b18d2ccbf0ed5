"""The video tower's token state (`VideoTokens`), its output (`VideoEncoderOutput`), and token hooks.

A token hook is a callable `VideoTokens -> VideoTokens` run before a chosen block (`apply_hooks`): the
way every token operation (drop, merge, select frames) enters the one block loop without a branch in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


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


def apply_hooks(tokens: VideoTokens, hooks: Mapping[int, Sequence[TokenHook]] | None, index: int) -> VideoTokens:
    """Run the hooks registered at `index` (before block `index`; `num_layers` = after the last)."""
    for hook in (hooks or {}).get(index, ()):
        tokens = hook(tokens)
        if not isinstance(tokens, VideoTokens):
            raise TypeError(f"video token hook {hook!r} (before block {index}) must return VideoTokens, "
                            f"got {type(tokens).__name__}")
    return tokens
