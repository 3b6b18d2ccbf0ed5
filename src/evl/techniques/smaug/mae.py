"""Masked autoencoding of video (VideoMAE / SMAUG) as a loss term: `objectives: {mae: {...}}`.

Each clip gets a tube (or random) mask at ratio r, drawn in the seeded collate from the sample's own
seed. The encoder computes the visible patches only; the term's decoder (an auxiliary module, never
needed by `evl eval`) predicts the pixels of the masked tubelets, normalised per tubelet and channel
(VideoMAE), and the loss is their mean squared error over the masked tubelets of real frames only.

`shared: true` (the default, SMAUG's saving): the batch transform also writes `video_keep_index`, so
the step's one video forward — the one VTC, VTM and MLM read — is the visible-patch forward, and the
decoder reads the same features. `shared: false` runs the masked forward apart, and the other terms
see the whole clip.
"""

from __future__ import annotations

import torch

from evl.losses.step import StepCache
from evl.losses.terms import BatchTransform, LossTerm, TermContext
from evl.models.masking import (
    blockwise_mask,
    keep_index_from_mask,
    normalize_targets,
    num_masked,
    patchify,
    random_mask,
    tube_mask,
)
from evl.techniques.smaug.mae_decoder import MAEDecoder

MASKS = {"tube": tube_mask, "random": random_mask}
MASK_KINDS = {**MASKS, "blockwise": blockwise_mask}
_SEED_MIX = 0x9E3779B97F4A7C15   # decorrelates the video mask from the caption mask drawn from the same seed


class MaskVideo:
    """Batch transform: a mask per clip → `batch[key]` (B, N) bool (+ `video_keep_index` when shared).

    Each clip's mask comes from a generator seeded by its sample seed (mixed with `salt`, so two terms
    draw different masks), so it does not depend on the batch it lands in (same masks after a resume
    with another batch split). A class, so DataLoader workers started with "spawn" can pickle it."""

    def __init__(self, patch_size: int, tubelet_size: int, ratio: float, kind: str, shared: bool,
                 key: str = "video_hidden", salt: int = _SEED_MIX, **options):
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.ratio, self.kind, self.shared, self.key, self.salt = ratio, kind, shared, key, salt
        self.options = options   # extra arguments of the mask function (blockwise: min_block)

    def __call__(self, batch: dict) -> dict:
        frames = batch["frames"]
        b, t, _, h, w = frames.shape
        grid = (t // self.tubelet_size, h // self.patch_size, w // self.patch_size)
        seeds = batch.get("sample_seeds")
        make = MASK_KINDS[self.kind]
        if seeds is None:
            mask = make(b, grid, self.ratio, **self.options)
        else:
            rows = [make(1, grid, self.ratio, torch.Generator().manual_seed((int(s) ^ self.salt) % (1 << 63)),
                         **self.options) for s in seeds.tolist()]
            mask = torch.cat(rows)
        batch[self.key] = mask
        if self.shared:
            batch["video_keep_index"] = keep_index_from_mask(mask)
        return batch


def real_tokens(frame_mask: torch.Tensor | None, b: int, n: int, tubelet_size: int) -> torch.Tensor | None:
    """(B, N) bool: the patch tokens whose tubelet holds at least one real (unpadded) frame; None when
    every frame is real."""
    if frame_mask is None:
        return None
    slots = frame_mask.view(b, -1, tubelet_size).any(dim=2)
    return slots[:, :, None].expand(b, slots.shape[1], n // slots.shape[1]).reshape(b, n)


def _visible_video(step: StepCache):
    """The clip encoded from its visible patches (the step's own video when the mask is shared)."""
    if step.batch.get("video_keep_index") is not None:
        return step["video"]
    mask = step.need("video_hidden", "step feature 'visible_video'")
    return step.model.video_features(step.batch["frames"], step.batch.get("frame_mask"),
                                     keep_index=keep_index_from_mask(mask), hooks=step.video_hooks or None)


class VideoMAETerm(LossTerm):
    """Pixel reconstruction of masked tubelets from the visible ones (see the module docstring)."""

    name = "mae"

    def __init__(self, ctx: TermContext, mask_ratio: float = 0.75, mask: str = "tube", decoder_layers: int = 4,
                 decoder_width: int | None = None, decoder_heads: int | None = None, norm_targets: bool = True,
                 shared: bool = True):
        super().__init__(ctx)
        video = ctx.model_cfg.video
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} is outside (0, 1): it is the fraction of patches hidden "
                             "from the encoder (VideoMAE 0.9, MAE and SMAUG's default 0.75)")
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r} is not one of {sorted(MASKS)}")
        if mask == "random" and video.attention == "divided":
            raise ValueError("mask='random' hides a different number of patches in each time slot, which divided "
                             "attention cannot run; use mask='tube' with video.attention='divided'")
        _, side, _ = video.native_grid
        per_row = side * side if mask == "tube" else video.native_grid[0] * side * side
        num_masked(per_row, float(mask_ratio))   # raises when nothing would stay visible
        width = decoder_width or video.hidden_size // 2
        head_dim = video.hidden_size // video.num_heads
        heads = decoder_heads or next(h for h in range(max(1, width // head_dim), 0, -1) if width % h == 0)
        for key, value in (("decoder_layers", decoder_layers), ("decoder_width", width), ("decoder_heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        self.ratio, self.mask, self.norm_targets, self.shared = float(mask_ratio), mask, bool(norm_targets), bool(shared)
        self.patch_size, self.tubelet_size, self.channels = video.patch_size, video.tubelet_size, video.in_channels
        patch_dim = video.tubelet_size * video.patch_size ** 2 * video.in_channels
        self.decoder = MAEDecoder(video.hidden_size, patch_dim, width, decoder_layers, heads)

    def batch_transforms(self) -> list[BatchTransform]:
        return [MaskVideo(self.patch_size, self.tubelet_size, self.ratio, self.mask, self.shared)]

    def features(self):
        return {"visible_video": _visible_video}

    def targets(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N, t·p·p·C) pixel targets in token order, normalised per tubelet when `norm_targets`."""
        patches = patchify(frames.float(), self.patch_size, self.tubelet_size)
        return normalize_targets(patches, self.channels) if self.norm_targets else patches

    def forward(self, step: StepCache) -> torch.Tensor:
        mask = step.need("video_hidden", f"loss term {self.name!r}")
        frames = step.batch["frames"]
        video = step["visible_video"]
        b, n = mask.shape
        grid_valid = real_tokens(step.batch.get("frame_mask"), b, n, self.tubelet_size)
        pred = self.decoder(video.tokens, video.positions, video.grid, mask, video.token_mask, grid_valid)
        m = pred.shape[1]
        idx = mask.nonzero()[:, 1].view(b, m)
        target = self.targets(frames).gather(1, idx[..., None].expand(-1, -1, pred.shape[-1]))
        err = (pred.float() - target).pow(2).mean(dim=-1)                  # (B, M)
        if grid_valid is None:
            return err.mean()
        weight = grid_valid.gather(1, idx).to(err.dtype)
        return (err * weight).sum() / weight.sum().clamp_min(1.0)
