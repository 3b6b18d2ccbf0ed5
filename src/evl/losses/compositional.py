"""Compositional hard negatives (NegCLIP-style): generated negative captions as extra negatives.

For each training caption, `evl.data.rewrite` writes up to `count` negatives that keep its words but
change one fact (an attribute, an object, an action, the binding of attributes to objects, the order of
events). Two loss terms use them; both may be on, with the same `kinds` and `count`:

* `neg_vtc` — contrastive, dual path: each video's softmax runs over the batch's captions *and* its own
  caption's negatives (video→text; the other captions of the same clip are not negatives), so the dual
  encoder must rank "a red circle, then a blue square" above "a blue circle, then a red square";
* `neg_vtm` — matching, fusion path: each (video, its caption) is a matched pair and (video, one of its
  caption's negatives) an unmatched one, so the cross-modal encoder is trained on the confusions the
  dual encoder makes rather than on random pairs.

Recipe: `objectives: {vtc: 1, neg_vtc: {weight: 1, kinds: [colour, noun, verb, swap, order], count: 2}}`.
Negatives are drawn per caption under the sample's seed (`sample_seeds`), so a resumed run draws the
same ones. Contrast is within this rank's batch (negatives are per caption, not gathered).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from evl.losses.functional import similarity_logits, vtm_loss
from evl.losses.step import StepCache, local_block
from evl.losses.terms import BatchTransform, LossTerm, TermContext

MAX_NEGATIVES = 8


class NegativeCaptions:
    """Batch transform: `texts` (B captions) → `negative_ids`, `negative_mask` (B·K, L) token ids of up to
    K negatives per caption (a caption with fewer repeats itself there) and `negative_valid` (B, K)."""

    def __init__(self, tokenizer, kinds: tuple[str, ...], count: int):
        self.tokenizer, self.kinds, self.count = tokenizer, tuple(kinds), count

    def __call__(self, batch: dict) -> dict:
        from evl.data.rewrite import negatives

        texts = batch.get("texts")
        if texts is None:
            return batch
        settings = (self.kinds, self.count)
        if "negative_ids" in batch:   # the other term made them already: same settings, same negatives
            if batch["negative_settings"] != settings:
                raise ValueError(f"neg_vtc and neg_vtm must use the same kinds and count, got {batch['negative_settings']} "
                                 f"and {settings}")
            return batch
        seeds = batch["sample_seeds"].tolist()
        rows, valid = [], []
        for text, seed in zip(texts, seeds, strict=True):
            found = [t for t, _ in negatives(text, self.count, self.kinds, np.random.default_rng([int(seed), 23]))]
            valid.append([True] * len(found) + [False] * (self.count - len(found)))
            rows.extend(found + [text] * (self.count - len(found)))
        tok = self.tokenizer(rows, max_length=min(batch["input_ids"].shape[1] + 8, 128))
        batch["negative_ids"], batch["negative_mask"] = tok.input_ids, tok.attention_mask
        batch["negative_valid"] = torch.tensor(valid, dtype=torch.bool).view(len(texts), self.count)
        batch["negative_settings"] = settings
        return batch


def _negative_text(step: StepCache):
    """The text tower on the negative captions: (B·K) TextFeatures, row i·K + k = caption i's k-th."""
    return step.model.text_features(step.need("negative_ids", "step feature 'negative_text'"), step.batch["negative_mask"])


class _NegativesTerm(LossTerm):
    def __init__(self, ctx: TermContext, kinds: list[str] | tuple[str, ...] | None = None, count: int = 2):
        super().__init__(ctx)
        from evl.data.rewrite import KINDS

        kinds = tuple(KINDS if kinds is None else kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty list of {', '.join(KINDS)}; got {list(kinds)}")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NEGATIVES:
            raise ValueError(f"count must be an integer from 1 to {MAX_NEGATIVES} (negatives per caption), got {count!r}")
        if ctx.tokenizer is None:
            raise ValueError(f"{self.name} tokenizes generated captions; build the objective with "
                             "TrainObjective.from_spec(model, objectives, tokenizer)")
        self.kinds, self.count = kinds, count

    def batch_transforms(self) -> list[BatchTransform]:
        return [NegativeCaptions(self.ctx.tokenizer, self.kinds, self.count)]

    def features(self):
        return {"negative_text": _negative_text}


class NegVTCTerm(_NegativesTerm):
    """Video→text InfoNCE over the batch's captions plus the video's own caption's negatives."""

    name: ClassVar[str] = "neg_vtc"

    def forward(self, step: StepCache) -> torch.Tensor:
        video, text, neg = step["video"], step["text"], step["negative_text"]
        b, k = step.batch["negative_valid"].shape
        batch_logits = similarity_logits(video.emb, text.emb, step["logit_scale"])          # (B, B), fp32
        others = local_block(step["clip_positives"], b) & ~torch.eye(b, dtype=torch.bool, device=batch_logits.device)
        batch_logits = batch_logits.masked_fill(others, float("-inf"))
        rows = torch.arange(b, device=batch_logits.device)
        neg_logits = similarity_logits(video.emb, neg.emb, step["logit_scale"]).view(b, b, k)[rows, rows]   # (B, K)
        neg_logits = neg_logits.masked_fill(~step.batch["negative_valid"].to(neg_logits.device), float("-inf"))
        logits = torch.cat([batch_logits, neg_logits], dim=1)
        return torch.nn.functional.cross_entropy(logits, torch.arange(b, device=logits.device))


class NegVTMTerm(_NegativesTerm):
    """Matching on the fusion path: (video, its caption) matched, (video, its first negative) not; clips
    whose caption had no negative contribute their matched pair only."""

    name: ClassVar[str] = "neg_vtm"
    needs_fusion: ClassVar[bool] = True

    def forward(self, step: StepCache) -> torch.Tensor:
        video, text, neg = step["video"], step["text"], step["negative_text"]
        valid = step.batch["negative_valid"].to(video.emb.device)
        b, k = valid.shape
        rows = torch.arange(b, device=valid.device)
        has = rows[valid[:, 0]]
        pos_logits = step.model.score_pairs(video, text)
        neg_logits = step.model.score_pairs(video.select(has), neg.select(has * k))
        logits = torch.cat([pos_logits, neg_logits])
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                            torch.zeros(len(has), dtype=torch.long, device=logits.device)])
        return vtm_loss(logits, labels)
