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

from evl.checkpoint import MODEL_PREFIX
from evl.errors import ConfigError
from evl.losses.registry import LossTerm, TermContext, build_terms
from evl.losses.step import FEATURES, Feature, StepCache


def run_objective(module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The Trainer's `loss_fn` for every objective module: the module computes its losses in `forward`
    (so that under DDP the forward goes through the wrapper)."""
    return module(batch)


class Objective(nn.Module):
    """What every training objective shares: sub-modules named in `frozen` (a teacher) take no gradient
    and stay in eval mode whatever `train()` says, so dropout and normalisation statistics never change
    them; `freeze(module)` makes one so."""

    frozen: tuple[str, ...] = ()

    @staticmethod
    def freeze(module: nn.Module | None) -> nn.Module | None:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()
        return module

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self


class TrainObjective(Objective):
    """`forward(batch) -> {"loss": Σ weight·term, "<term>": unweighted value, ...}`.

    `weights` names the terms that add a loss; terms with `adds_loss = False` (token operations) are
    in `terms` only."""

    pattern_root = MODEL_PREFIX   # train.lr_mults patterns name the model's own module paths

    def __init__(self, model: nn.Module, terms: Mapping[str, LossTerm], weights: Mapping[str, float]):
        super().__init__()
        with_loss = {name for name, term in terms.items() if term.adds_loss}
        if with_loss != set(weights):
            raise ValueError(f"terms with a loss {sorted(with_loss)} and weights {sorted(weights)} must name "
                             "the same loss terms")
        self.model = model
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)
        self._features = _merge_features(self.terms)

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
        step = StepCache(self.model, batch, self._features, list(self.terms.values()))
        losses = {name: term(step) for name, term in self.terms.items() if term.adds_loss}
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
