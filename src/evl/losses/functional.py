"""The loss functions behind evl's loss terms: contrastive (VTC, EgoNCE), matching (VTM with hard
negatives), MLM, QA, multiple choice and distillation.

All are pure functions (or tiny modules) on tensors so each can be unit-tested on hand-computable
cases; `evl.losses.terms` wraps each into a named loss term a recipe can list. Contrastive losses gather embeddings across ranks with gradient (``evl.distributed``) so that
W ranks of batch B behave like one process on batch W·B.

Convention for similarity matrices: ``sim[i, j]`` is video i against text j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evl.distributed import all_gather_with_grad, get_rank, get_world_size, is_dist_initialized
from evl.errors import EvlError

__all__ = [
    "HardNegatives",
    "build_vtm_pairs",
    "distill_loss",
    "egonce_loss",
    "egonce_positive_mask",
    "mc_loss",
    "mlm_loss",
    "qa_loss",
    "sample_hard_negatives",
    "similarity_logits",
    "vtc_loss",
    "vtm_loss",
]


def _check_pair(video_emb: torch.Tensor, text_emb: torch.Tensor, name: str) -> None:
    if video_emb.dim() != 2 or text_emb.dim() != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(
            f"{name}: expected video_emb and text_emb of the same shape (B, D), "
            f"got {tuple(video_emb.shape)} and {tuple(text_emb.shape)}"
        )


def _as_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, nn.Module):
        logit_scale = logit_scale()
    return torch.as_tensor(logit_scale, device=like.device).to(like.dtype)


def similarity_logits(video_emb: torch.Tensor, text_emb: torch.Tensor,
                      logit_scale: torch.Tensor | float) -> torch.Tensor:
    """scale · normalise(video) @ normalise(text)ᵀ in fp32, also inside a bf16 autocast region.

    Why fp32: at a logit scale near 100, bf16's 8-bit mantissa puts neighbouring logits ~0.5 apart,
    which is the size of the differences a contrastive softmax has to resolve.
    """
    with torch.autocast(video_emb.device.type, enabled=False):
        v = F.normalize(video_emb.float(), dim=-1)
        t = F.normalize(text_emb.float(), dim=-1)
        return _as_scale(logit_scale, v) * v @ t.t()


def _gathered_logits(
    video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (video→all-texts logits, text→all-videos logits, row offset of this rank), in fp32.

    Queries are this rank's rows; keys are the global batch. Row i's positive is column offset+i.
    Autocast is switched off here so the logits and the logsumexp over them stay fp32 (see
    :func:`similarity_logits`).
    """
    with torch.autocast(video_emb.device.type, enabled=False):
        v = F.normalize(video_emb.float(), dim=-1)
        t = F.normalize(text_emb.float(), dim=-1)
        offset = 0
        v_all, t_all = v, t
        if gather and is_dist_initialized() and get_world_size() > 1:
            v_all = all_gather_with_grad(v)
            t_all = all_gather_with_grad(t)
            offset = get_rank() * v.shape[0]
        scale = _as_scale(logit_scale, v)
        return scale * v @ t_all.t(), scale * t @ v_all.t(), offset


def vtc_loss(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (video→text and text→video, averaged) on L2-normalised features.

    ``logit_scale`` is the multiplier (e.g. ``LogitScale()()``), not its log. Under torch.distributed
    with ``gather=True`` both sides are gathered with gradient; this rank's rows are queries against
    all W·B columns with labels offset by rank·B. Per-rank loss is the mean over local rows, so the mean
    of the per-rank losses — and, after DDP's gradient averaging, the gradients — equal the single-process
    loss on the global batch.
    """
    _check_pair(video_emb, text_emb, "vtc_loss")
    logits_v2t, logits_t2v, offset = _gathered_logits(video_emb, text_emb, logit_scale, gather)
    labels = torch.arange(video_emb.shape[0], device=video_emb.device) + offset
    with torch.autocast(video_emb.device.type, enabled=False):
        return 0.5 * (F.cross_entropy(logits_v2t, labels) + F.cross_entropy(logits_t2v, labels))


def egonce_positive_mask(verbs: Sequence[Sequence], nouns: Sequence[Sequence], match: str = "any") -> torch.Tensor:
    """(B, B) bool: which pairs of clips count as positives, from their verb and noun tags.

    ``match="any"`` (EgoVLP/EgoVLPv2's rule, this function's default): i and j share at least one verb
    AND at least one noun (the `egonce` loss term defaults to "all").
    ``match="all"``: i and j have the same set of verbs AND the same set of nouns. The two agree on
    single-action captions (EgoClip narrations: one verb, one or two nouns); on captions that describe
    several events "any" makes unrelated clips positives — measured on SynthVL (1–3 events per clip),
    25% of the off-diagonal pairs of a batch of 32 share a verb and a noun, 0.3% have equal tag sets,
    and EgoNCE with "any" left the dual encoder at chance.

    The diagonal is always True (a clip is a positive of its own caption, even with empty tags).
    Under DDP build it on the *global* batch (gather the lists with ``evl.distributed.all_gather_object``).
    """
    if len(verbs) != len(nouns):
        raise ValueError(f"egonce_positive_mask: got {len(verbs)} verb lists but {len(nouns)} noun lists")
    if match not in ("any", "all"):
        raise ValueError(f"egonce_positive_mask: match must be 'any' or 'all', got {match!r}")
    vsets = [frozenset(v) for v in verbs]
    nsets = [frozenset(n) for n in nouns]
    b = len(vsets)
    mask = torch.eye(b, dtype=torch.bool)
    for i in range(b):
        for j in range(i + 1, b):
            if match == "any":
                hit = bool(vsets[i] & vsets[j]) and bool(nsets[i] & nsets[j])
            else:
                hit = bool(vsets[i]) and bool(nsets[i]) and vsets[i] == vsets[j] and nsets[i] == nsets[j]
            if hit:
                mask[i, j] = mask[j, i] = True
    return mask


def _multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −log(Σ_pos exp / Σ_all exp), computed with logsumexp for stability."""
    pos = logits.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - pos).mean()


def egonce_loss(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positive_mask: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """EgoNCE (EgoVLP): symmetric InfoNCE where every pair in ``positive_mask`` counts as positive.

    ``positive_mask`` is the (N, N) mask of the *global* batch (N = world·B; N = B in one process),
    e.g. from :func:`egonce_positive_mask`; the diagonal is always added. ``None`` means diagonal
    only, which reduces exactly to :func:`vtc_loss`. Row i of the video→text term uses mask[i, :];
    the text→video term uses mask[:, i], so an asymmetric mask is handled correctly.
    """
    _check_pair(video_emb, text_emb, "egonce_loss")
    logits_v2t, logits_t2v, offset = _gathered_logits(video_emb, text_emb, logit_scale, gather)
    b, n = logits_v2t.shape
    rows = torch.arange(b, device=video_emb.device) + offset
    eye = torch.zeros(b, n, dtype=torch.bool, device=video_emb.device)
    eye[torch.arange(b, device=eye.device), rows] = True
    if positive_mask is None:
        pos_v2t = pos_t2v = eye
    else:
        if positive_mask.shape != (n, n):
            raise ValueError(
                f"egonce_loss: positive_mask must cover the global batch, expected ({n}, {n}), "
                f"got {tuple(positive_mask.shape)}"
            )
        mask = positive_mask.to(device=video_emb.device, dtype=torch.bool)
        pos_v2t = mask[rows] | eye
        pos_t2v = mask.t()[rows] | eye
    with torch.autocast(video_emb.device.type, enabled=False):
        return 0.5 * (_multi_positive_nce(logits_v2t, pos_v2t) + _multi_positive_nce(logits_t2v, pos_t2v))


@dataclass
class HardNegatives:
    """Indices of one sampled hard negative per item (ALBEF / EgoVLPv2 VTM).

    ``video_for_text[j]``: a video that is a hard negative for text j.
    ``text_for_video[i]``: a text that is a hard negative for video i.
    """

    video_for_text: torch.Tensor
    text_for_video: torch.Tensor


def _sample_rows(
    logits: torch.Tensor, excluded: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One index per row from softmax(logits) over the non-excluded columns.

    Rows with no allowed column fall back to a uniform choice among columns other than the row's own.
    """
    b = logits.shape[0]
    has_valid = (~excluded).any(dim=1)
    # a diverging run can put NaN/inf in the similarities; sampling uniformly there keeps the step
    # alive so the Trainer's non-finite guard (not torch.multinomial) decides what happens
    logits = torch.nan_to_num(logits.float(), nan=0.0, posinf=0.0, neginf=0.0)
    masked = logits.masked_fill(excluded, float("-inf"))
    # Rows without any valid column: sample uniformly among j != i (the only honest fallback).
    off_diag = ~torch.eye(b, dtype=torch.bool, device=logits.device)
    fallback = torch.zeros_like(masked).masked_fill(~off_diag, float("-inf"))
    masked = torch.where(has_valid[:, None], masked, fallback)
    probs = masked.softmax(dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """Sample one hard negative text per video and one hard negative video per text.

    ``sim[i, j]`` is the (already temperature-scaled) similarity of video i and text j; candidates are
    drawn from softmax(sim row/column) with positives — the diagonal and ``positive_mask`` — excluded,
    so semantically equivalent pairs (EgoNCE positives) are not taught as mismatches. A row with no
    valid negative (everything is a positive) falls back to a uniformly random index ≠ its own: it
    may then be a mask-positive, but VTM still needs a negative for every item. B = 1 has no
    negative at all and raises.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(
            f"sample_hard_negatives: expected a square (B, B) similarity, got {tuple(sim.shape)}"
        )
    b = sim.shape[0]
    if b < 2:
        raise EvlError("sample_hard_negatives: a batch of 1 has no negatives; use a batch size of at least 2")
    excluded = torch.eye(b, dtype=torch.bool, device=sim.device)
    if positive_mask is not None:
        if positive_mask.shape != sim.shape:
            raise ValueError(
                f"sample_hard_negatives: positive_mask must match sim, expected {tuple(sim.shape)}, "
                f"got {tuple(positive_mask.shape)}"
            )
        excluded = excluded | positive_mask.to(device=sim.device, dtype=torch.bool)
    text_for_video = _sample_rows(sim, excluded, generator)
    video_for_text = _sample_rows(sim.t(), excluded.t(), generator)
    return HardNegatives(video_for_text=video_for_text, text_for_video=text_for_video)


def build_vtm_pairs(
    batch_size: int, negatives: HardNegatives
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(video_idx, text_idx, labels) of 3B pairs for video-text matching, ALBEF-style.

    Order: B positives (i, i) label 1; B pairs (i, text_for_video[i]) label 0; B pairs
    (video_for_text[j], j) label 0. One positive per two negatives, each anchor seen once as positive.
    """
    b = batch_size
    for name, t in (
        ("video_for_text", negatives.video_for_text),
        ("text_for_video", negatives.text_for_video),
    ):
        if t.shape != (b,):
            raise ValueError(f"build_vtm_pairs: {name} must have shape ({b},), got {tuple(t.shape)}")
    device = negatives.video_for_text.device
    ar = torch.arange(b, device=device)
    video_idx = torch.cat([ar, ar, negatives.video_for_text.long()])
    text_idx = torch.cat([ar, negatives.text_for_video.long(), ar])
    labels = torch.cat(
        [torch.ones(b, dtype=torch.long, device=device), torch.zeros(2 * b, dtype=torch.long, device=device)]
    )
    return video_idx, text_idx, labels


def vtm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way match head (class 1 = matched)."""
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"vtm_loss: expected logits (N, 2) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits, labels.long())


def _masked_token_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over labelled positions; 0 (with a gradient path) when nothing is labelled.

    ``F.cross_entropy(reduction="mean")`` returns NaN when every label is ignored, which happens with
    short captions and random masking; a NaN would poison the whole step.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return total / count


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Masked-language-model loss: logits (B, L, V), labels (B, L) with ``ignore_index`` on unmasked tokens."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"mlm_loss: expected logits (B, L, V) and labels (B, L), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return _masked_token_ce(logits, labels, ignore_index)


def qa_loss(logits: torch.Tensor, answer_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Open-ended QA as classification over the answer vocabulary: logits (B, A), answer_ids (B,).

    Answers outside the vocabulary are encoded as ``ignore_index`` (see ``AnswerVocab.encode``) and skipped.
    """
    if logits.dim() != 2 or answer_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"qa_loss: expected logits (B, A) and answer_ids (B,), got {tuple(logits.shape)} and {tuple(answer_ids.shape)}"
        )
    return _masked_token_ce(logits, answer_ids, ignore_index)


def mc_loss(scores: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
    """Multiple choice: cross-entropy over the per-option scores (B, K) with the correct option index (B,)."""
    if scores.dim() != 2 or answer_index.shape != scores.shape[:1]:
        raise ValueError(
            f"mc_loss: expected scores (B, K) and answer_index (B,), got {tuple(scores.shape)} and {tuple(answer_index.shape)}"
        )
    if answer_index.numel() and (answer_index.min() < 0 or answer_index.max() >= scores.shape[1]):
        raise ValueError(
            f"mc_loss: answer_index must lie in [0, {scores.shape[1]}), got {answer_index.tolist()}"
        )
    return F.cross_entropy(scores, answer_index.long())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """VLAP's QFormer distillation: MSE between student and (detached, frozen) teacher tokens (B, N, D);
    `mask` (B, N) keeps only the teacher's real tokens (not those of padded frames)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"distill_loss: student and teacher must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; map the student tokens to the teacher's count first"
        )
    if mask is None:
        return F.mse_loss(student, teacher.detach())
    w = mask.to(student.dtype)[..., None].expand_as(student)
    return ((student - teacher.detach()) ** 2 * w).sum() / w.sum().clamp_min(1.0)
