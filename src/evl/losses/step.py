"""The per-step cache that loss terms share: each feature is computed once per step, on first request.

A loss term asks `step["video"]`, `step["text"]`, `step["masked_text"]`, ... and never calls the model
for a feature another term may also need. So VTC, VTM and MLM together run the video tower once and
the text tower twice (plain and masked captions), whatever order or subset of terms a recipe lists,
and a new term adds no duplicate forward pass.

Features are named functions of the step (`FEATURES` below). A technique that needs a new one (a
masked video, a teacher's output) provides it from its loss term (`LossTerm.features`), so nothing
here changes when a technique is added. Video token operations (drop, merge, select frames) reach
the video tower as hooks (`LossTerm.video_hooks(step)`, asked once per step, so a hook may read the
step: the paired text, the training progress), applied whenever the step encodes video.

Batch entries the built-in features read besides frames and captions: `video_keep_index` (B, K) —
when a batch transform put it there (masked autoencoding), the step's video is encoded from those
patches only, so every term shares one forward of the visible tokens; `train_progress` — the
fraction of training done, which the Trainer writes into every batch (schedules read it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from evl.distributed import all_gather_object, get_rank
from evl.errors import EvlError

Feature = Callable[["StepCache"], Any]


class StepCache:
    """What one training step has computed so far: `step[name]` computes the feature on first use.

    `batch` is the collated batch; `model` the VideoLanguageModel being trained; `terms` the enabled
    loss terms, whose `video_hooks(step)` make up the token hooks of this step's video tower.
    """

    def __init__(self, model: torch.nn.Module, batch: Mapping[str, Any], features: Mapping[str, Feature],
                 terms: Sequence[Any] = ()):
        self.model = model
        self.batch = batch
        self._terms = tuple(terms)
        self._hooks: dict[int, list] | None = None
        self._features = features
        self._values: dict[str, Any] = {}

    @property
    def video_hooks(self) -> dict[int, list]:
        """Layer index → token hooks, gathered from the terms on first use in this step."""
        if self._hooks is None:
            hooks: dict[int, list] = {}
            for term in self._terms:
                for layer, fns in term.video_hooks(self).items():
                    hooks.setdefault(layer, []).extend(fns)
            self._hooks = hooks
        return self._hooks

    @property
    def progress(self) -> float:
        """The fraction of training done at this step, in [0, 1] (0 outside the Trainer)."""
        return float(self.batch.get("train_progress", 0.0))

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            if name not in self._features:
                raise EvlError(f"no loss term provides the step feature {name!r}; "
                               f"available: {', '.join(sorted(self._features))}")
            self._values[name] = self._features[name](self)
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        """Whether the feature has been computed in this step already (it is not computed here)."""
        return name in self._values

    def need(self, key: str, user: str) -> Any:
        """A batch entry a loss term or step feature (`user`) cannot work without; a missing one is
        an error naming both."""
        if key not in self.batch or self.batch[key] is None:
            raise EvlError(f"{user} needs the batch entry {key!r}, which this data does not "
                           f"provide (batch has: {', '.join(sorted(k for k in self.batch if self.batch[k] is not None))}). "
                           "Check the recipe's task and objectives.")
        return self.batch[key]


# ------------------------------------------------------------------------------------- built-in features


def _video(step: StepCache):
    b = step.batch
    return step.model.video_features(step.need("frames", "step feature 'video'"), b.get("frame_mask"),
                                     keep_index=b.get("video_keep_index"), hooks=step.video_hooks or None)


def _text(step: StepCache):
    return step.model.text_features(step.need("input_ids", "step feature 'text'"), step.batch["attention_mask"])


def _masked_text(step: StepCache):
    return step.model.text_features(step.need("mlm_input_ids", "step feature 'masked_text'"), step.batch["attention_mask"])


def _logit_scale(step: StepCache) -> torch.Tensor:
    return step.model.logit_scale()


def _clip_positives(step: StepCache) -> torch.Tensor:
    """(W·B, W·B) bool over the global batch: pairs showing the same clip (captions of one clip are
    positives, not negatives). Every rank runs the same collective, so no rank waits on another."""
    b = step.batch["frames"].shape[0]
    keys = step.batch.get("clip_keys") or step.batch.get("video_names") or [f"{get_rank()}:{i}" for i in range(b)]
    keys = [k for part in all_gather_object(list(keys)) for k in part]
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    clip = torch.tensor([ids[key] for key in keys], device=step.batch["frames"].device)
    return clip[:, None] == clip[None, :]


FEATURES: dict[str, Feature] = {
    "video": _video,
    "text": _text,
    "masked_text": _masked_text,
    "logit_scale": _logit_scale,
    "clip_positives": _clip_positives,
}


def local_block(mask: torch.Tensor, b: int) -> torch.Tensor:
    """This rank's (B, B) block of a global (W·B, W·B) mask (hard negatives are mined per rank)."""
    r = get_rank()
    return mask[r * b:(r + 1) * b, r * b:(r + 1) * b]
