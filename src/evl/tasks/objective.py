"""The training objective of every recipe, as an `nn.Module` around the model.

Why a module: under DistributedDataParallel the forward must go through the DDP wrapper for gradient
synchronisation to be prepared, so the losses are computed inside `forward` (the Trainer calls
`loss_fn(wrapped, batch) = wrapped(batch)`). Weights select the mix: pre-training uses any of
VTC / EgoNCE / VTM / MLM, fine-tuning uses VTC+VTM (retrieval), QA (open-ended) or MC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evl.distributed import all_gather_object, get_rank
from evl.models.model import VideoLanguageModel
from evl.objectives import (
    build_vtm_pairs,
    egonce_loss,
    egonce_positive_mask,
    mc_loss,
    mlm_loss,
    qa_loss,
    sample_hard_negatives,
    vtm_loss,
)


@dataclass
class ObjectiveWeights:
    """Loss weights; a weight of 0 switches the objective (and its forward passes) off."""

    vtc: float = 1.0
    egonce: float = 0.0
    vtm: float = 1.0
    mlm: float = 1.0
    qa: float = 0.0
    mc: float = 0.0

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if v < 0:
                raise ValueError(f"objectives.{k} must be >= 0, got {v}")
        if not any(vars(self).values()):
            raise ValueError("all objective weights are 0: nothing to train (set e.g. objectives.vtc=1)")


class TrainObjective(nn.Module):
    """`forward(batch) -> {"loss": weighted sum, "vtc": ..., ...}` for the enabled objectives."""

    def __init__(self, model: VideoLanguageModel, weights: ObjectiveWeights):
        super().__init__()
        self.model = model
        self.weights = weights
        if model.cfg.fusion.kind == "none" and (weights.vtm or weights.mlm or weights.qa):
            raise ValueError("objectives vtm/mlm/qa need a fusion model; this model has fusion.kind='none'")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, w = self.model, self.weights
        if w.mc:
            return self._multiple_choice(batch)
        video = m.video_features(batch["frames"], batch["frame_mask"])
        if w.qa:
            question = m.text_features(batch["input_ids"], batch["attention_mask"])
            loss = qa_loss(m.answer(video, question), batch["answer_ids"])
            return {"loss": w.qa * loss, "qa": loss.detach()}
        text = m.text_features(batch["input_ids"], batch["attention_mask"])
        scale = m.logit_scale()
        out: dict[str, torch.Tensor] = {}
        same_clip, tags = self._positive_masks(batch, video.emb.device, with_tags=bool(w.egonce))
        if w.vtc:
            # captions of the same clip in one batch are positives, not negatives (multi-positive
            # InfoNCE; identical to plain VTC when every clip appears once)
            out["vtc"] = egonce_loss(video.emb, text.emb, scale, positive_mask=same_clip)
        if w.egonce:
            out["egonce"] = egonce_loss(video.emb, text.emb, scale, positive_mask=same_clip | tags)
        if w.vtm:
            # hard negatives exclude the same clip, and the EgoNCE positives only when EgoNCE is on:
            # otherwise pairs sharing a verb and a noun are exactly the hard negatives VTM should see
            excluded = same_clip | tags if w.egonce else same_clip
            out["vtm"] = self._vtm(video, text, scale, self._local(excluded, video.emb.shape[0]))
        if w.mlm:
            masked = m.text_features(batch["mlm_input_ids"], batch["attention_mask"])
            logits, targets = m.mlm_logits(m.fuse(video, masked).text_tokens, batch["mlm_labels"])
            out["mlm"] = mlm_loss(logits[None], targets[None])  # only masked positions were projected
        total = sum(getattr(w, k) * v for k, v in out.items())
        return {"loss": total, **{k: v.detach() for k, v in out.items()}, "temperature": (1 / scale).detach()}

    @staticmethod
    def _positive_masks(batch: dict, device: torch.device, with_tags: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Global-batch (W·B, W·B) masks: pairs from the same clip, and pairs sharing a verb and a noun
        (EgoNCE; all False when not asked for or the data has no tags). Every rank runs the same
        collectives every step, so no rank can wait on one that skipped them."""
        b = batch["frames"].shape[0]
        keys = batch.get("clip_keys") or batch.get("video_names") or [f"{get_rank()}:{i}" for i in range(b)]
        keys = [k for part in all_gather_object(list(keys)) for k in part]
        ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        clip = torch.tensor([ids[key] for key in keys], device=device)
        same = clip[:, None] == clip[None, :]
        tags = torch.zeros_like(same)
        if with_tags:
            verbs = [v for part in all_gather_object(batch.get("verbs") or [[]] * b) for v in part]
            nouns = [n for part in all_gather_object(batch.get("nouns") or [[]] * b) for n in part]
            tags = egonce_positive_mask(verbs, nouns).to(device)
        return same, tags

    @staticmethod
    def _local(mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
        """This rank's (B, B) block of a global positive mask (hard negatives are mined per rank)."""
        if mask is None:
            return None
        r = get_rank()
        return mask[r * b:(r + 1) * b, r * b:(r + 1) * b]

    def _vtm(self, video, text, scale, positives) -> torch.Tensor:
        sim = scale.detach() * video.emb.detach() @ text.emb.detach().t()
        negatives = sample_hard_negatives(sim, positive_mask=positives)
        vidx, tidx, labels = build_vtm_pairs(sim.shape[0], negatives)
        logits = self.model.score_pairs(video.select(vidx), text.select(tidx))
        return vtm_loss(logits, labels)

    def _multiple_choice(self, batch: dict) -> dict[str, torch.Tensor]:
        scores = multiple_choice_scores(self.model, batch["frames"], batch["frame_mask"],
                                        batch["option_ids"], batch["option_mask"])
        loss = mc_loss(scores, batch["answer_index"])
        return {"loss": self.weights.mc * loss, "mc": loss.detach()}


def multiple_choice_scores(model: VideoLanguageModel, frames: torch.Tensor, frame_mask: torch.Tensor,
                           option_ids: torch.Tensor, option_mask: torch.Tensor) -> torch.Tensor:
    """(B, K) option scores: dual cosine similarity (×logit scale) plus, with a fusion model, the
    matching log-odds of each (video, option) pair — EgoVLPv2's dual+fusion ensemble."""
    b, k, length = option_ids.shape
    video = model.video_features(frames, frame_mask)
    text = model.text_features(option_ids.reshape(b * k, length), option_mask.reshape(b * k, length))
    rows = torch.arange(b, device=frames.device).repeat_interleave(k)
    dual = (video.emb[rows] * text.emb).sum(-1) * model.logit_scale()
    if model.cfg.fusion.kind == "none":
        return dual.view(b, k)
    logits = model.score_pairs(video.select(rows), text)
    return (dual + logits[:, 1] - logits[:, 0]).view(b, k)
