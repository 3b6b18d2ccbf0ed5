"""Which k of N candidate frames a frame-level QA model looks at (VLAP's Frame-Prompter and its baselines).

Every selector returns a `Selection`: for each clip, k candidate indices in temporal order, which of
the k picks are real (`mask`; a clip with fewer than k real frames has fewer real picks), and in
training the straight-through one-hot `weights` (B, k, N) through which the answer loss reaches the
scorer. Padded candidates (`frame_mask` false) are never picked.

* `segment_ids` cuts each clip's *real* frames into k contiguous segments of near-equal length;
* `uniform_pick` takes the middle frame of each segment;
* `gumbel_pick` (VLAP) takes one frame per segment from learned logits: Gumbel-softmax with a hard
  straight-through one-hot in training (temperature from `temperature_at`), arg-max at inference;
* `topk_pick` (`evl.models.selection`; the SeViLA-style localizer) keeps the k best-scored frames, re-sorted into temporal order.

`FramePrompter` gives the logits: it reads only cheap descriptors of every candidate (the frozen
video tower's patch embeddings, no transformer block), pools each frame's patches by attention with
the question as the query (`question_aware`, the paper's idea) or by mean+max (`question_aware: false`,
as VLAP's released code, whose selector never sees the question), adds temporal context with a
1-D convolution over the candidates (a change between neighbouring frames marks an event), and
scores each frame with a small MLP. Only the k picked frames then go through the video tower's blocks,
the QFormer and the answerer, so the cost falls with k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evl.models.selection import Selection, real_frames


def segment_ids(frame_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool real frames → (B, N) long segment of each real frame in [0, k), -1 for padding.

    Segment i holds the real frames of rank r (in temporal order) with floor(r·k / L) = i, L = the
    clip's real frame count: k contiguous segments whose lengths differ by at most one; when L < k
    only L segments are non-empty."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = frame_mask.to(torch.bool)
    rank = real.long().cumsum(dim=1) - 1
    length = real.long().sum(dim=1, keepdim=True).clamp_min(1)
    seg = torch.div(rank * k, length, rounding_mode="floor")
    return torch.where(real, seg, torch.full_like(seg, -1))


def _members(frame_mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, N) bool: candidate n belongs to segment i."""
    seg = segment_ids(frame_mask, k)
    return seg[:, None, :] == torch.arange(k, device=seg.device)[None, :, None]


def uniform_pick(frame_mask: torch.Tensor, k: int) -> Selection:
    """The middle real frame of each of k segments (uniform sampling of k frames over the clip)."""
    members = _members(frame_mask, k)
    count = members.sum(dim=2)                                       # (B, k)
    nth = members.long().cumsum(dim=2)                               # 1-based rank within the segment
    middle = members & (nth == torch.div(count + 1, 2, rounding_mode="floor")[..., None])
    return Selection(middle.float().argmax(dim=2), count > 0)


def gumbel_pick(logits: torch.Tensor, frame_mask: torch.Tensor | None, k: int, temperature: float = 1.0,
                training: bool = False, generator: torch.Generator | None = None) -> Selection:
    """One frame per segment from (B, N) logits. Training: Gumbel noise, softmax at `temperature`
    within the segment, hard one-hot forward and the soft gradient (straight-through). Inference:
    the arg-max of the logits, no noise (deterministic)."""
    b, n = logits.shape
    members = _members(real_frames(frame_mask, b, n, logits.device), k)
    seg_logits = logits.float()[:, None, :].expand(b, k, n)
    if training:
        u = torch.rand(seg_logits.shape, generator=generator, device=logits.device).clamp(1e-9, 1 - 1e-9)
        seg_logits = (seg_logits - torch.log(-torch.log(u))) / temperature
    seg_logits = seg_logits.masked_fill(~members, float("-inf"))
    present = members.any(dim=2)
    index = seg_logits.argmax(dim=2)
    weights = None
    if training:
        soft = torch.softmax(seg_logits.masked_fill(~present[..., None], 0.0), dim=2) * present[..., None]
        hard = F.one_hot(index, n).to(soft.dtype) * present[..., None]
        weights = hard - soft.detach() + soft
    return Selection(index, present, weights)


def temperature_at(progress: float, start: float, end: float) -> float:
    """Exponential decay from `start` (progress 0) to `end` (progress 1), as VLAP's per-step schedule."""
    progress = min(max(progress, 0.0), 1.0)
    return start * math.exp(progress * math.log(end / start))


class FramePrompter(nn.Module):
    """(B, N, P, D) patch embeddings of the candidates (+ the question) → (B, N) frame logits."""

    def __init__(self, patch_dim: int, question_dim: int, width: int = 64, question_aware: bool = True):
        super().__init__()
        self.question_aware = question_aware
        self.patch = nn.Linear(patch_dim, width)
        if question_aware:
            self.query = nn.Linear(question_dim, width)
        self.temporal = nn.Conv1d(width * 2, width, kernel_size=3, padding=1)
        scorer_in = width * (4 if question_aware else 3)
        self.score = nn.Sequential(nn.LayerNorm(scorer_in), nn.Linear(scorer_in, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, patches: torch.Tensor, frame_mask: torch.Tensor | None = None,
                question: torch.Tensor | None = None) -> torch.Tensor:
        b, n, p, _ = patches.shape
        x = self.patch(patches)                                       # (B, N, P, w)
        if self.question_aware:
            if question is None:
                raise ValueError("a question-aware Frame-Prompter needs the question embedding")
            q = self.query(question)                                  # (B, w)
            attn = torch.einsum("bnpw,bw->bnp", x, q) / math.sqrt(x.shape[-1])
            pooled = torch.einsum("bnp,bnpw->bnw", attn.softmax(dim=-1), x)
            desc = torch.cat([pooled, x.amax(dim=2)], dim=-1)
        else:
            desc = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=-1)
        if frame_mask is not None:
            desc = desc * frame_mask[..., None].to(desc.dtype)
        context = self.temporal(desc.transpose(1, 2)).transpose(1, 2)  # (B, N, w): change across frames
        parts = [desc, context]
        if self.question_aware:
            parts.append(desc[..., : x.shape[-1]] * q[:, None, :])
        logits = self.score(torch.cat(parts, dim=-1)).squeeze(-1)
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask.to(torch.bool), float("-inf"))
        return logits
