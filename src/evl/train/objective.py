"""The training objective of every recipe: the model plus the recipe's loss terms, as one `nn.Module`.

Why a module: under DistributedDataParallel the forward must go through the DDP wrapper for gradient
synchronisation to be prepared, so the losses are computed inside `forward` (the Trainer calls
`loss_fn(wrapped, batch) = wrapped(batch)`).

State layout: `model.*` is the VideoLanguageModel (what `evl eval`, `--init` and `from_pretrained`
read); `terms.<name>.*` is the auxiliary state of the loss terms (a frozen teacher or tokenizer, a
decoder, a selector). Checkpoints store the two apart (`evl.train.state`), so a model trained with
a teacher still loads in `evl eval` with nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from evl.errors import ConfigError
from evl.losses import LossTerm, TermContext, build_terms
from evl.losses.step import FEATURES, Feature, StepCache

MODEL_PREFIX = "model."


class TrainObjective(nn.Module):
    """`forward(batch) -> {"loss": Σ weight·term, "<term>": unweighted value, ...}`."""

    pattern_root = MODEL_PREFIX   # train.lr_mults patterns name the model's own module paths

    def __init__(self, model: nn.Module, terms: Mapping[str, LossTerm], weights: Mapping[str, float]):
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError(f"terms {sorted(terms)} and weights {sorted(weights)} must name the same loss terms")
        self.model = model
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self._features = _merge_features(self.terms)
        self._hooks = _merge_hooks(self.terms)

    @classmethod
    def from_spec(cls, model: nn.Module, objectives: Mapping[str, Any], tokenizer=None,
                  where: str = "objectives") -> TrainObjective:
        """Build from a recipe's `objectives:` mapping (see `evl.losses.parse_objectives`)."""
        terms, weights = build_terms(objectives, TermContext(model.cfg, tokenizer), where)
        return cls(model, terms, weights)

    def batch_transforms(self) -> list:
        """What the terms need done to each collated batch (inside the seeded collate)."""
        return [t for term in self.terms.values() for t in term.batch_transforms()]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        step = StepCache(self.model, batch, self._features, self._hooks)
        losses = {name: term(step) for name, term in self.terms.items()}
        out: dict[str, torch.Tensor] = {"loss": sum(self.weights[k] * v for k, v in losses.items())}
        out.update({k: v.detach() for k, v in losses.items()})
        if "logit_scale" in step:
            out["temperature"] = (1 / step["logit_scale"]).detach()
        return out


def _merge_features(terms: Mapping[str, LossTerm]) -> dict[str, Feature]:
    features = dict(FEATURES)
    for name, term in terms.items():
        for key, fn in term.features().items():
            if key in features and features[key] is not fn:
                raise ConfigError(f"loss term {name!r} provides the step feature {key!r}, which another part "
                                  "already provides; give it another name")
            features[key] = fn
    return features


def _merge_hooks(terms: Mapping[str, LossTerm]) -> dict[int, list]:
    hooks: dict[int, list] = {}
    for term in terms.values():
        for layer, fns in term.video_hooks().items():
            hooks.setdefault(layer, []).extend(fns)
    return hooks
