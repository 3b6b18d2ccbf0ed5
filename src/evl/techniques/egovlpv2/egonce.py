"""EgoNCE (EgoVLP / EgoVLPv2) as a loss term: `objectives: {egonce: 1}` in place of `vtc`.

InfoNCE over the global batch in which a pair whose verb and noun tags match counts as a positive too
(the loss function is `evl.losses.functional.egonce_loss`; with no extra positives it is VTC). The
tags come from the annotation records (`verbs`, `nouns`), gathered from every rank.
"""

from __future__ import annotations

import torch

from evl.distributed import all_gather_object
from evl.losses.functional import egonce_loss, egonce_positive_mask
from evl.losses.step import Feature, StepCache
from evl.losses.terms import LossTerm, TermContext


class EgoNCETerm(LossTerm):
    """EgoNCE (EgoVLP/EgoVLPv2): pairs whose verb and noun tags match count as positives too.

    `match`: "all" (default: equal verb sets and equal noun sets) or "any" (EgoVLP's rule: at least one
    shared verb and one shared noun); see `egonce_positive_mask` for why the default differs. The
    step feature `tag_positives` is this term's, so VTM excludes exactly these pairs from its negatives.
    """

    name = "egonce"
    positives = ("clip_positives", "tag_positives")

    def __init__(self, ctx: TermContext, match: str = "all"):
        super().__init__(ctx)
        if match not in ("any", "all"):
            raise ValueError(f"match must be 'any' or 'all', got {match!r}")
        self.match = match

    def features(self) -> dict[str, Feature]:
        return {"tag_positives": self._tag_positives}

    def _tag_positives(self, step: StepCache) -> torch.Tensor:
        """(W·B, W·B) bool over the global batch (tags gathered from every rank); all False off the
        diagonal when the data has no tags."""
        b = step.batch["frames"].shape[0]
        verbs = [v for part in all_gather_object(step.batch.get("verbs") or [[]] * b) for v in part]
        nouns = [n for part in all_gather_object(step.batch.get("nouns") or [[]] * b) for n in part]
        return egonce_positive_mask(verbs, nouns, self.match).to(step.batch["frames"].device)

    def forward(self, step: StepCache) -> torch.Tensor:
        return egonce_loss(step["video"].emb, step["text"].emb, step["logit_scale"],
                           positive_mask=step["clip_positives"] | step["tag_positives"])
