"""SMAUG's space-time token sparsification as a token operation of the training objective:
`objectives: {sparsify: {keep_rate: 0.7, layers: [2], keep_frames: 2, frame_layer: 1}}`.

It adds no loss (`adds_loss = False`): it puts hooks into the video tower of every training step
(`evl.techniques.smaug.sparsify`). Spatially, before each block in `layers`, every time slot keeps its top
⌈ρ·S⌉ patch tokens by CLS attention and fuses the rest into one token; ρ follows a cosine schedule
from 1 to `keep_rate` over the first `rate_warmup` fraction of training. Temporally, before block
`frame_layer`, the text-guided frame selector (an auxiliary module, trained through the other losses
straight through its hard top-k) keeps `keep_frames` time slots per clip. `keep_frames: 0` (or null)
switches frame selection off; `layers: []` switches spatial sparsification off.

Evaluation (`evl eval`) encodes whole clips: the model itself has no sparsification in it. To choose
frames for a text at inference, load the trained selector from a training checkpoint (its auxiliary
state) with `frame_selector_from_checkpoint` and pass its hook:

    selector, layer = frame_selector_from_checkpoint("runs/smaug-tiny/checkpoints/step_00000150")
    video = model.video_features(frames, hooks={layer: [selector.hook(model.encode_text(ids, mask))]})
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evl.losses.step import StepCache
from evl.losses.terms import LossTerm, TermContext
from evl.techniques.smaug.sparsify import SpatialSparsify, TextGuidedFrameSelector, keep_rate_at


class SparsifyTerm(LossTerm):
    name = "sparsify"
    adds_loss = False

    def __init__(self, ctx: TermContext, keep_rate: float = 0.7, layers: Sequence[int] = (2,),
                 rate_warmup: float = 0.3, keep_frames: int | None = None, frame_layer: int = 1,
                 selector_dim: int = 128):
        super().__init__(ctx)
        cfg = ctx.model_cfg
        video = cfg.video
        depth = video.num_layers
        slots = video.num_frames // video.tubelet_size
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate < 1.0:
            raise ValueError(f"keep_rate={keep_rate!r} is outside (0, 1): it is the fraction ρ of each time slot's "
                             "patch tokens kept at each sparsification layer (EViT: 0.7)")
        if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers={layers!r} must be a list of block indices, e.g. [2]")
        for i in layers:
            if not 0 <= i < depth:
                raise ValueError(f"layers contains {i}, beyond the video tower's depth: a sparsification layer "
                                 f"must be in [0, {depth - 1}] (video.num_layers={depth}; tokens are dropped "
                                 "before that block)")
        if layers and not video.use_cls_token:
            raise ValueError("spatial sparsification ranks patches by the CLS token's attention, and this video "
                             "tower has none (video.use_cls_token: false); set layers: [] or use a CLS token")
        if isinstance(rate_warmup, bool) or not isinstance(rate_warmup, (int, float)) or not 0.0 <= rate_warmup <= 1.0:
            raise ValueError(f"rate_warmup={rate_warmup!r} must be in [0, 1] (the fraction of training over "
                             "which the keep rate goes from 1 down to keep_rate)")
        keep_frames = keep_frames or 0
        if isinstance(keep_frames, bool) or not isinstance(keep_frames, int) or not 0 <= keep_frames <= slots:
            raise ValueError(f"keep_frames={keep_frames!r} must be in [1, {slots}]: the model's clips have {slots} "
                             f"time slots (video.num_frames {video.num_frames} / tubelet_size "
                             f"{video.tubelet_size}); 0 or null switches frame selection off")
        fuse_start = video.first_fused_layer
        if keep_frames and not 0 <= frame_layer < fuse_start:
            raise ValueError(f"frame_layer={frame_layer!r} must be in [0, {fuse_start - 1}]: frames are chosen "
                             f"for the paired text before a block of the video tower's dual part "
                             f"(video.num_layers={depth}, fused top layers={video.fusion_layers})")
        self.keep_rate, self.layers, self.rate_warmup = float(keep_rate), sorted(set(layers)), float(rate_warmup)
        self.frame_layer = frame_layer
        self.selector = (TextGuidedFrameSelector(video.hidden_size, cfg.embed_dim, keep_frames, selector_dim)
                         if keep_frames else None)

    def rate(self, progress: float) -> float:
        return keep_rate_at(progress, self.keep_rate, self.rate_warmup)

    def video_hooks(self, step: StepCache) -> dict[int, list]:
        hooks: dict[int, list] = {}
        if self.selector is not None:
            hooks[self.frame_layer] = [self.selector.hook(step["text"].emb)]
        rate = self.rate(step.progress)
        blocks = step.model.video.blocks
        for i in self.layers:
            hooks.setdefault(i, []).append(SpatialSparsify(blocks[i], rate))
        return hooks

    def forward(self, step: StepCache):  # pragma: no cover - adds_loss is False: never called
        raise RuntimeError("the sparsify term adds no loss")


def frame_selector_from_checkpoint(checkpoint: str | Path) -> tuple[TextGuidedFrameSelector, int]:
    """(the trained text-guided frame selector, the block it runs before) from a Trainer checkpoint
    (`checkpoints/step_*`, which keeps the auxiliary state); `final/` holds the model only."""
    from evl.checkpoint import read_config, term_state
    from evl.config import from_dict
    from evl.errors import CheckpointError
    from evl.models.model import ModelConfig

    directory = Path(checkpoint)
    cfg = read_config(directory)
    spec = ((cfg.get("recipe") or {}).get("objectives") or {}).get("sparsify")
    if not isinstance(spec, dict) or not spec.get("keep_frames"):
        raise CheckpointError(f"{directory}: the run was not trained with frame selection (its recipe has no "
                              "objectives.sparsify.keep_frames)")
    state = term_state(directory, SparsifyTerm.name, "selector")
    term = SparsifyTerm(TermContext(from_dict(ModelConfig, cfg["model"], where="model")), **spec)
    term.selector.load_state_dict(state)
    return term.selector.eval(), term.frame_layer
