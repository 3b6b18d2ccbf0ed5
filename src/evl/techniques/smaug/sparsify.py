"""SMAUG's space-time token sparsification, as token hooks of the video tower.

Spatial (EViT-style), `SpatialSparsify`: before a chosen block, rank each time slot's patch tokens by
the attention the CLS token pays them in that block (its query against their keys, softmax as the
block computes it, averaged over heads), keep the top ⌈ρ·S⌉ of the S patch tokens of every slot, and
fuse every other token of the slot into one token: their sum weighted by that attention (EViT's
"inattentive token fusion"). EViT drops inside the block, between attention and MLP; evl drops just
before the block, scoring with the block's own query/key projections, so the block then computes
attention and MLP over the kept tokens only. Every slot keeps the same count, which divided
attention needs and which keeps time slots aligned for frame selection; the fused token sits at the
end of its slot with position -1 (a token made of several patches, see `VideoTokens`). A later stage
folds the previous fused token into the new one.

Temporal, `TextGuidedFrameSelector`: an auxiliary module that scores each time slot against the
paired text (a scaled dot product between the slot's mean token and the text embedding, both
projected) and keeps the top k slots, in temporal order, for the remaining blocks. Selection is
hard; the gradient reaches the scorer straight through (the kept tokens are multiplied by
`hard + (soft - soft.detach())`, exactly 1 in the forward pass).

`keep_rate_at` is the keep-rate schedule: cosine from 1 (nothing dropped) down to ρ over the first
`warmup` fraction of training, as EViT does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evl.models.selection import topk_pick
from evl.models.tokens import VideoTokens
from evl.models.video import VideoBlock


def keep_rate_at(progress: float, target: float, warmup: float) -> float:
    """Keep rate at `progress` (fraction of training done): cosine from 1 to `target` over `warmup`."""
    if warmup <= 0 or progress >= warmup:
        return target
    f = max(progress, 0.0) / warmup
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * f))


def num_kept(n: int, rate: float) -> int:
    """⌈rate·n⌉, at least 1 (1e-9 absorbs float error: 0.7·10 = 7.000000000000001 keeps 7, not 8)."""
    return max(1, min(n, math.ceil(rate * n - 1e-9)))


class SlotLayout:
    """How the patch tokens of `tokens` sit in time slots: `slots` slots of `size` tokens each, the last
    one a fused token when `fused` (position -1), the others patches of that slot."""

    def __init__(self, tokens: VideoTokens):
        b, k = tokens.positions.shape
        t = tokens.time_slots
        if k % t:
            raise ValueError(f"token sparsification needs the same number of tokens in every time slot; "
                             f"{k} patch tokens do not split into {t} slots (use tube masking, not random, "
                             "with sparsification)")
        self.slots, self.size = t, k // t
        pos = tokens.positions.view(b, t, self.size)
        last = pos[..., -1] < 0
        self.fused = bool(last.all())
        patches = pos[..., :-1] if self.fused else pos
        if bool((patches < 0).any()) or (bool(last.any()) and not self.fused):
            raise ValueError("token sparsification expects at most one fused token (position -1), at the end "
                             "of each time slot; these tokens were rearranged by another hook")
        h, w = tokens.grid[1], tokens.grid[2]
        slot_of = patches // (h * w)
        if patches.shape[-1] and not bool((slot_of == slot_of[..., :1]).all()):
            raise ValueError("token sparsification needs the tokens grouped slot by slot with the same count in "
                             "each slot (use tube masking, not random, with sparsification)")
        self.candidates = patches.shape[-1]   # patch tokens per slot that may be kept


def cls_attention(block: VideoBlock, tokens: VideoTokens) -> torch.Tensor:
    """(B, t, S) attention of the CLS token to each patch-side token of each slot in `block`, averaged
    over heads; joint blocks normalise over the whole sequence, divided blocks within each slot (their
    space attention). Padded tokens get 0."""
    if tokens.num_prefix < 1:
        raise ValueError("spatial sparsification ranks tokens by the CLS token's attention; this video tower "
                         "has no CLS token (video.use_cls_token: false)")
    attn = block.attn
    layout = SlotLayout(tokens)
    b, n, d = tokens.x.shape
    c, t, s = tokens.num_prefix, layout.slots, layout.size
    h = block.norm1(tokens.x)
    wq, wk, _ = attn.qkv.weight.chunk(3, dim=0)
    bq, bk = (None, None) if attn.qkv.bias is None else attn.qkv.bias.chunk(3)[:2]
    q = F.linear(h[:, :1], wq, bq).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = F.linear(h, wk, bk).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(attn.head_dim)   # (B, H, N)
    if tokens.key_mask is not None:
        logits = logits.masked_fill(~tokens.key_mask[:, None, :], float("-inf"))
    if block.divided:   # per slot: [CLS, that slot's tokens]
        per_slot = logits[:, :, c:].reshape(b, -1, t, s)
        cls = logits[:, :, :1, None].expand(-1, -1, t, 1)
        weights = torch.softmax(torch.cat([cls, per_slot], dim=-1).float(), dim=-1)[..., 1:]
    else:
        weights = torch.softmax(logits.float(), dim=-1)[:, :, c:].reshape(b, -1, t, s)
    return torch.nan_to_num(weights, nan=0.0).mean(dim=1).to(tokens.x.dtype)


def sparsify_slots(tokens: VideoTokens, scores: torch.Tensor, keep: int) -> VideoTokens:
    """Keep the `keep` highest-scored patch tokens of every slot (in their original order) and fuse the
    rest of the slot — dropped patches and any earlier fused token — into one token at the slot's end:
    Σ score·token. `scores` (B, t, S) as from `cls_attention`. Nothing dropped → `tokens` unchanged."""
    layout = SlotLayout(tokens)
    b, _, d = tokens.x.shape
    c, t, s, m = tokens.num_prefix, layout.slots, layout.size, layout.candidates
    if not 1 <= keep <= m:
        raise ValueError(f"keep must be in [1, {m}] (patch tokens per slot), got {keep}")
    if keep == m:
        return tokens
    x = tokens.x[:, c:].reshape(b, t, s, d)
    pos = tokens.positions.view(b, t, s)
    valid = (tokens.key_mask[:, c:].reshape(b, t, s) if tokens.key_mask is not None
             else torch.ones(b, t, s, dtype=torch.bool, device=x.device))
    top = scores[..., :m].topk(keep, dim=-1).indices.sort(dim=-1).values            # (B, t, keep)
    dropped = torch.ones(b, t, s, dtype=torch.bool, device=x.device)
    dropped.scatter_(-1, top, False)                                                # fused token included
    w = (scores * dropped).to(x.dtype)
    fused = (w[..., None] * x).sum(dim=2, keepdim=True)                             # (B, t, 1, D)
    kept_x = x.gather(2, top[..., None].expand(-1, -1, -1, d))
    new_x = torch.cat([kept_x, fused], dim=2).reshape(b, t * (keep + 1), d)
    new_pos = torch.cat([pos.gather(2, top), pos.new_full((b, t, 1), -1)], dim=2).reshape(b, -1)
    key_mask = None
    if tokens.key_mask is not None:
        fused_valid = (valid & dropped).any(dim=2, keepdim=True)
        new_valid = torch.cat([valid.gather(2, top), fused_valid], dim=2).reshape(b, -1)
        key_mask = torch.cat([tokens.key_mask[:, :c], new_valid], dim=1)
    return tokens.replace(x=torch.cat([tokens.x[:, :c], new_x], dim=1), positions=new_pos, key_mask=key_mask)


class SpatialSparsify:
    """Token hook: before `block`, keep ⌈rate·S⌉ patch tokens per slot by CLS attention, fuse the rest."""

    def __init__(self, block: VideoBlock, rate: float):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"keep rate must be in (0, 1], got {rate}")
        self.block, self.rate = block, rate

    def __call__(self, tokens: VideoTokens) -> VideoTokens:
        layout = SlotLayout(tokens)
        keep = num_kept(layout.candidates, self.rate)
        if keep == layout.candidates:
            return tokens
        return sparsify_slots(tokens, cls_attention(self.block, tokens), keep)


class TextGuidedFrameSelector(nn.Module):
    """Scores time slots against the paired text and keeps the top `keep` of them (see module doc)."""

    def __init__(self, video_dim: int, text_dim: int, keep: int, dim: int = 128):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep (frames to keep) must be >= 1, got {keep}")
        self.keep = keep
        self.norm = nn.LayerNorm(video_dim)
        self.video = nn.Linear(video_dim, dim)
        self.text = nn.Linear(text_dim, dim)
        self.scale = dim ** -0.5

    def scores(self, tokens: VideoTokens, text: torch.Tensor) -> torch.Tensor:
        """(B, t) relevance of each time slot to the row's text (B, text_dim); padded slots get -inf."""
        layout = SlotLayout(tokens)
        b, _, d = tokens.x.shape
        if text.shape[0] != b:
            raise ValueError(f"frame selection pairs each clip with its text: {b} clips but {text.shape[0]} "
                             "texts (select frames before the fused layers, on the dual pass)")
        x = tokens.x[:, tokens.num_prefix:].reshape(b, layout.slots, layout.size, d)
        if tokens.key_mask is None:
            valid = torch.ones(b, layout.slots, layout.size, 1, dtype=x.dtype, device=x.device)
        else:
            valid = tokens.key_mask[:, tokens.num_prefix:].reshape(b, layout.slots, layout.size, 1).to(x.dtype)
        slot = (x * valid).sum(2) / valid.sum(2).clamp_min(1.0)
        s = (self.video(self.norm(slot)) * self.text(text.to(x.dtype))[:, None]).sum(-1) * self.scale
        return s.float().masked_fill(valid.sum(2)[..., 0] == 0, float("-inf"))

    def select(self, tokens: VideoTokens, text: torch.Tensor) -> VideoTokens:
        """The `keep` best slots of each clip, in temporal order; the rest are dropped."""
        layout = SlotLayout(tokens)
        t, s = layout.slots, layout.size
        if self.keep > t:
            raise ValueError(f"frame selection keeps {self.keep} time slots but the clip has only {t} "
                             f"(frames / tubelet_size); lower keep_frames to at most {t}")
        if self.keep == t:
            return tokens
        scores = self.scores(tokens, text)
        soft = torch.softmax(scores, dim=-1)
        idx = topk_pick(scores, None, self.keep).index                                  # (B, keep), in order
        hard = torch.zeros_like(soft).scatter(1, idx, 1.0)
        gate = (hard + (soft - soft.detach())).gather(1, idx)                            # exactly 1, with gradient
        b, _, d = tokens.x.shape
        c = tokens.num_prefix
        x = tokens.x[:, c:].reshape(b, t, s, d)
        x = x.gather(1, idx[..., None, None].expand(-1, -1, s, d)) * gate[..., None, None].to(x.dtype)
        pos = tokens.positions.view(b, t, s).gather(1, idx[..., None].expand(-1, -1, s)).reshape(b, -1)
        key_mask = None
        if tokens.key_mask is not None:
            kept = tokens.key_mask[:, c:].reshape(b, t, s).gather(1, idx[..., None].expand(-1, -1, s))
            key_mask = torch.cat([tokens.key_mask[:, :c], kept.reshape(b, -1)], dim=1)
        return tokens.replace(x=torch.cat([tokens.x[:, :c], x.reshape(b, -1, d)], dim=1), positions=pos,
                              key_mask=key_mask, time_slots=self.keep)

    def hook(self, text: torch.Tensor):
        """A token hook that selects frames for these texts (row i of the batch ↔ text i)."""
        return lambda tokens: self.select(tokens, text)
