"""Loss terms: each objective as one small unit with a name, what it needs, and its loss.

A term is an `nn.Module` so that whatever it owns that is not the model — a frozen teacher, a frozen
tokenizer, a reconstruction decoder, a frame selector — is an *auxiliary module* of the training
objective: trained (or kept frozen) with the run, saved in the checkpoint's auxiliary state for
`--resume`, and never needed by `evl eval` (see `evl.train.objective`).

What a term may declare besides its `forward(step)`:

* `batch_transforms()` — functions applied to the collated batch inside the seeded collate (MLM
  masking here; video masks for masked video modelling), so masks are reproducible and a resumed run
  sees the masks an uninterrupted one would;
* `features()` — new named step features (`evl.losses.step`) it computes for itself or other terms;
* `video_hooks(step)` — token operations inserted into the video tower (layer index → hooks), asked
  once per step so that a hook may depend on the step (the paired text, the training progress).

Options come from the recipe: `objectives: {mlm: {weight: 1.0, mask_prob: 0.15}}` passes
`mask_prob=0.15` to `MLMTerm`; a plain number is the weight alone.

A term with `adds_loss = False` is a token operation with no loss of its own (SMAUG's sparsification):
it contributes hooks, features and modules, takes options but no weight, and `forward` is not called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from evl.losses.functional import (
    build_vtm_pairs,
    egonce_loss,
    mc_loss,
    mlm_loss,
    qa_loss,
    sample_hard_negatives,
    similarity_logits,
    vtm_loss,
)
from evl.losses.step import Feature, StepCache, local_block

BatchTransform = Callable[[dict], dict]


@dataclass
class TermContext:
    """What a term may read when it is built: the model's config, the tokenizer, and which other
    terms are enabled (VTM's negatives depend on whether EgoNCE is on)."""

    model_cfg: Any
    tokenizer: Any = None
    enabled: tuple[str, ...] = ()
    positives: tuple[str, ...] = ("clip_positives",)   # union of the enabled terms' `positives`


class LossTerm(nn.Module):
    """Base class. Subclasses set `name` and implement `forward(step) -> unweighted scalar loss`."""

    name: ClassVar[str] = ""
    needs_fusion: ClassVar[bool] = False   # matching, MLM and QA read the cross-modal path
    positives: ClassVar[tuple[str, ...]] = ()   # step features a contrastive term counts as positives
    adds_loss: ClassVar[bool] = True   # False: hooks / features / modules only, no weight, no forward

    def __init__(self, ctx: TermContext):
        super().__init__()
        self.ctx = ctx

    def batch_transforms(self) -> list[BatchTransform]:
        return []

    def features(self) -> dict[str, Feature]:
        return {}

    def video_hooks(self, step: StepCache) -> dict[int, list]:
        return {}

    def forward(self, step: StepCache) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class VTCTerm(LossTerm):
    """Video-text contrastive (symmetric InfoNCE over the global batch). Captions of the same clip
    in one batch are positives, not negatives (identical to plain VTC when each clip appears once)."""

    name = "vtc"
    positives = ("clip_positives",)

    def forward(self, step: StepCache) -> torch.Tensor:
        return egonce_loss(step["video"].emb, step["text"].emb, step["logit_scale"],
                           positive_mask=step["clip_positives"])


class VTMTerm(LossTerm):
    """Video-text matching on the fusion path with one hard negative text per video and one hard
    negative video per text (ALBEF / EgoVLPv2), drawn from softmax(similarity) of this rank's batch.

    Negatives exclude what any enabled contrastive term counts as a positive (the same clip always;
    pairs sharing a verb and a noun only when EgoNCE is on): otherwise such pairs are exactly the hard
    negatives VTM should see.

    `easy_warmup`: for this fraction of training the negatives are drawn uniformly (easy) instead of
    from softmax(similarity) — a curriculum: the matching head first learns to tell unrelated pairs
    apart, then the dual encoder's confusions.
    """

    name = "vtm"
    needs_fusion = True

    def __init__(self, ctx: TermContext, easy_warmup: float = 0.0):
        super().__init__(ctx)
        if isinstance(easy_warmup, bool) or not isinstance(easy_warmup, (int, float)) or not 0.0 <= easy_warmup <= 1.0:
            raise ValueError(f"easy_warmup must be a fraction of training in [0, 1], got {easy_warmup!r}")
        self.easy_warmup = float(easy_warmup)

    def forward(self, step: StepCache) -> torch.Tensor:
        video, text = step["video"], step["text"]
        excluded = step["clip_positives"]
        for feature in self.ctx.positives:
            excluded = excluded | step[feature]
        with torch.no_grad():
            sim = similarity_logits(video.emb.detach(), text.emb.detach(), step["logit_scale"].detach())
            if step.progress < self.easy_warmup:
                sim = torch.zeros_like(sim)   # uniform over the allowed negatives
        b = sim.shape[0]
        negatives = sample_hard_negatives(sim, positive_mask=local_block(excluded, b))
        vidx, tidx, labels = build_vtm_pairs(b, negatives)
        logits = step.model.score_pairs(video.select(vidx), text.select(tidx))
        return vtm_loss(logits, labels)


class MaskTokens:
    """Batch transform: BERT masking of the captions → `mlm_input_ids`, `mlm_labels`.

    Each caption is masked with its own generator, seeded by the sample's seed (`sample_seeds`, drawn
    per sample under the Trainer's (seed, epoch, index) RNG) and over its real length only: a caption
    gets the same mask whatever batch, rank, accumulation step or padding it comes with, so a run
    resumed with another `train.grad_accum` or number of ranks masks exactly as before. A class (not
    a closure) so DataLoader workers started with "spawn" can pickle it."""

    def __init__(self, tokenizer, prob: float, unmaskable: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.prob = prob
        self.unmaskable = unmaskable

    def __call__(self, batch: dict) -> dict:
        from evl.data.text import mask_tokens

        if "input_ids" not in batch:
            return batch
        ids, mask = batch["input_ids"], batch["attention_mask"]
        seeds = batch.get("sample_seeds")
        if seeds is None:
            masked = mask_tokens(ids, mask, self.tokenizer, prob=self.prob, unmaskable=self.unmaskable)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked.input_ids, masked.labels
            return batch
        out, labels = ids.clone(), torch.full_like(ids, -100)
        for i, n in enumerate(mask.sum(1).tolist()):
            g = torch.Generator().manual_seed(int(seeds[i]))
            row = mask_tokens(ids[i:i + 1, :n], mask[i:i + 1, :n], self.tokenizer, prob=self.prob, generator=g,
                              unmaskable=self.unmaskable)
            out[i, :n], labels[i, :n] = row.input_ids[0], row.labels[0]
        batch["mlm_input_ids"], batch["mlm_labels"] = out, labels
        return batch


class MLMTerm(LossTerm):
    """Masked language modelling on the fusion path: the masked caption attends to the video.

    `skip_function_words`: never mask English function words (`evl.data.text.FUNCTION_WORDS`), so the
    targets are the content words — colours, objects, actions — that the text alone cannot tell and the
    fusion has to read from the video; `mask_prob` then applies to the content words only.
    """

    name = "mlm"
    needs_fusion = True

    def __init__(self, ctx: TermContext, mask_prob: float = 0.15, skip_function_words: bool = False):
        super().__init__(ctx)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"objectives.mlm.mask_prob must be in (0, 1), got {mask_prob}")
        if not isinstance(skip_function_words, bool):
            raise ValueError(f"skip_function_words must be true or false, got {skip_function_words!r}")
        self.mask_prob = mask_prob
        self.skip_function_words = skip_function_words

    def batch_transforms(self) -> list[BatchTransform]:
        if self.ctx.tokenizer is None:
            raise ValueError("MLM masks captions with the text tower's tokenizer; build the objective with "
                             "TrainObjective.from_spec(model, objectives, tokenizer)")
        from evl.data.text import function_word_ids

        skip = function_word_ids(self.ctx.tokenizer) if self.skip_function_words else frozenset()
        return [MaskTokens(self.ctx.tokenizer, self.mask_prob, skip)]

    def forward(self, step: StepCache) -> torch.Tensor:
        labels = step.need("mlm_labels", f"loss term {self.name!r}")
        fused = step.model.fuse(step["video"], step["masked_text"]).text_tokens
        logits, targets = step.model.mlm_logits(fused, labels)
        return mlm_loss(logits[None], targets[None])   # only masked positions were projected


class QATerm(LossTerm):
    """Open-ended QA: classification over the training answers from the fused (video, question)."""

    name = "qa"
    needs_fusion = True

    def forward(self, step: StepCache) -> torch.Tensor:
        return qa_loss(step.model.answer(step["video"], step["text"]), step.need("answer_ids", f"loss term {self.name!r}"))


class MCTerm(LossTerm):
    """Multiple choice: cross-entropy over the options' dual+fusion scores."""

    name = "mc"

    def forward(self, step: StepCache) -> torch.Tensor:
        scores = step.model.option_scores(step["video"], step.need("option_ids", f"loss term {self.name!r}"),
                                          step.batch["option_mask"])
        return mc_loss(scores, step.need("answer_index", f"loss term {self.name!r}"))
