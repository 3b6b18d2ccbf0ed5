"""Masked video modelling (E-ViLM) as a loss term: `objectives: {mvm: {target: codes, tokenizer: DIR}}`.

Each clip gets a mask at ratio r (blockwise tubes by default: BEiT-v2's block generator on each time
slot's grid, blocks of at least `min_block` patches, the same blocks in every slot; or random, or tube), drawn in the seeded collate from the
sample's own seed. The masked patches are replaced by the video tower's mask token — the encoder sees
the whole sequence, unlike MAE — and a linear head on the video tokens predicts, at the masked
positions of real frames only:

* `target: codes` — the code a frozen VQ tokenizer (`evl vq train`) gives that tubelet: cross-entropy
  over its K codes. A tokenizer trained on teacher features gives E-ViLM's semantic labels; one
  trained on pixels gives VQ-VAE codes;
* `target: pixel` — the tubelet's pixels normalised per tubelet and channel: mean squared error.

No MVM term at all is the ablation's "none". The masked forward is this term's own (`masked_video`):
the other terms keep reading the whole clip. The tokenizer and the head are auxiliary modules of the
training objective, so `evl eval` never needs them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evl.losses.step import StepCache
from evl.losses.terms import BatchTransform, LossTerm, TermContext
from evl.models.masking import normalize_targets, num_masked, patchify
from evl.techniques.evilm.vq_tokenizer import VQTokenizer, check_same_tubelets
from evl.techniques.smaug.mae import MASK_KINDS, MaskVideo, real_tokens

TARGETS = ("codes", "pixel")
_SALT = 0xD1B54A32D192ED03   # MVM's masks differ from MAE's and MLM's drawn from the same sample seed


def _masked_video(step: StepCache):
    """The clip with its `mvm_hidden` patches replaced by the mask token (full sequence)."""
    mask = step.need("mvm_hidden", "step feature 'masked_video'")
    return step.model.video_features(step.batch["frames"], step.batch.get("frame_mask"), hidden=mask)


class MVMTerm(LossTerm):
    """Predict a target per masked tubelet from the rest of the clip (see the module docstring)."""

    name = "mvm"

    def __init__(self, ctx: TermContext, target: str = "codes", tokenizer: str | None = None,
                 mask: str = "blockwise", mask_ratio: float = 0.4, min_block: int = 4):
        super().__init__(ctx)
        video = ctx.model_cfg.video
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {list(TARGETS)} (no MVM at all: drop the term)")
        if mask not in MASK_KINDS:
            raise ValueError(f"mask={mask!r} is not one of {sorted(MASK_KINDS)}")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} is outside (0, 1): the fraction of patches replaced by "
                             "the mask token (BEiT-v2: 0.4)")
        t, h, w = video.native_grid
        if num_masked(h * w if mask != "random" else t * h * w, float(mask_ratio)) == 0:
            raise ValueError(f"mask_ratio={mask_ratio} masks no patch of a {h}x{w} grid; raise it")
        if isinstance(min_block, bool) or not isinstance(min_block, int) or min_block < 1:
            raise ValueError(f"min_block={min_block!r} must be a positive integer: the smallest block area in "
                             "patches (BEiT-v2: 16 on a 14x14 grid)")
        if mask == "blockwise" and min_block > h * w:
            raise ValueError(f"min_block={min_block} is more than a time slot's {h}x{w} = {h * w} patches")
        self.target, self.kind, self.ratio, self.min_block = target, mask, float(mask_ratio), min_block
        self.patch_size, self.tubelet_size, self.channels = video.patch_size, video.tubelet_size, video.in_channels
        self.tokenizer: VQTokenizer | None = None
        if target == "codes":
            if not tokenizer:
                raise ValueError("target=codes needs tokenizer: the final/ folder of `evl vq train`")
            if not Path(tokenizer).is_dir():
                raise ValueError(f"tokenizer={tokenizer!r} does not exist; train one with `evl vq train` "
                                 "and pass its final/ folder")
            self.tokenizer = VQTokenizer.from_pretrained(tokenizer)
            check_same_tubelets(self.tokenizer.cfg.video, video, f"objectives.mvm.tokenizer={tokenizer}")
            out = self.tokenizer.cfg.num_codes
        else:
            if tokenizer:
                raise ValueError("target=pixel takes no tokenizer; drop it or use target=codes")
            out = video.tubelet_size * video.patch_size ** 2 * video.in_channels
        self.head = nn.Sequential(nn.LayerNorm(video.hidden_size), nn.Linear(video.hidden_size, out))

    def batch_transforms(self) -> list[BatchTransform]:
        options = {"min_block": self.min_block} if self.kind == "blockwise" else {}
        return [MaskVideo(self.patch_size, self.tubelet_size, self.ratio, self.kind, shared=False,
                          key="mvm_hidden", salt=_SALT, **options)]

    def features(self):
        return {"masked_video": _masked_video}

    def targets(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N) codes, or (B, N, t·p·p·C) normalised pixels, in the video tower's token order."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(frames)
        return normalize_targets(patchify(frames.float(), self.patch_size, self.tubelet_size), self.channels)

    def forward(self, step: StepCache) -> torch.Tensor:
        mask = step.need("mvm_hidden", f"loss term {self.name!r}")
        video = step["masked_video"]
        b, n = mask.shape
        patches = video.tokens[:, video.tokens.shape[1] - n:]          # drop the CLS token
        valid = real_tokens(step.batch.get("frame_mask"), b, n, self.tubelet_size)
        where = mask if valid is None else mask & valid
        pred = self.head(patches[where]).float()                        # (M, out)
        target = self.targets(step.batch["frames"])[where]
        if self.tokenizer is not None:
            return F.cross_entropy(pred, target)
        return F.mse_loss(pred, target)
