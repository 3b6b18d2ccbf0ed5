"""EgoVLPv2's fusion in the backbone: `fusion.kind: backbone`.

The towers' top `fusion.num_layers` layers carry gated cross-attention (gate initialised to 0, built by
`VideoBlock` / `TextLayer` when their config has `fusion_layers`); with the gates shut they are the plain
towers, so one network is both the fast dual encoder and the fusion encoder. `BackboneFusion` drives
both towers through those layers in lockstep from the states that entered them (`VideoFeatures.lower`,
`TextFeatures.lower`), so the lower layers run once for both paths. It is listed in
`evl.models.fusion.FUSIONS` beside the separate cross-modal encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evl.models.features import FusionOutput, TextFeatures, VideoFeatures
from evl.models.text import masked_mean
from evl.models.tokens import apply_hooks


class BackboneFusion(nn.Module):
    """EgoVLPv2 fusion: no parameters of its own (the towers' top layers carry the gated
    cross-attention); `fuse` restarts both towers from the states entering their fused layers.

    The pair representation is [video pooling, text mean pooling] of the fused tokens — each tower
    pooled as its dual embedding is, so at initialisation it is exactly the two unimodal summaries.
    Mean pooling of the text rather than its [CLS] token: the pre-trained MiniLM layers were trained
    for mean pooling, and measured on a pre-trained tiny model (VTM trained alone for 25 steps), the
    matching head told a caption's own clip from a random one on 94% of held-out captions with the
    mean against 87% with [CLS].
    """

    in_towers = True   # the towers build gated cross-attention into their top `num_layers` layers

    def __init__(self, text_dim: int, video_dim: int, cfg: Any):
        super().__init__()
        self.fused_dim = video_dim + text_dim

    def fuse(self, model: nn.Module, video: VideoFeatures, text: TextFeatures) -> FusionOutput:
        if video.lower is None or text.lower is None:
            raise ValueError("backbone fusion needs the features of this model's own video_features/text_features")
        v, t = run_lockstep(model, video, text)
        out = model.video.finalize(v.x)
        pooled = torch.cat([model.video.pool(out, v.key_mask), masked_mean(t, text.attention_mask)], dim=-1)
        return FusionOutput(text_tokens=t, pooled=pooled)


def run_lockstep(model: nn.Module, video: VideoFeatures, text: TextFeatures):
    """Run the fused top layers of both towers together, cross-attention on.

    Both updates in a step read the *previous* states of the other tower, so the result does not
    depend on which tower is stepped first. The video side goes through the tower's one block loop
    (`run_blocks`, one block at a time); the token hooks of each layer run before both towers read
    the video state, as in the dual pass.
    """
    vs, ts = model.cfg.video.first_fused_layer, model.cfg.text.first_fused_layer
    layers = model.text.layers[ts:]
    if len(layers) != len(model.video.blocks) - vs:
        raise ValueError(f"backbone fusion needs the same number of fused layers in both towers; got video "
                         f"{len(model.video.blocks) - vs} and text {len(layers)}")
    v, t, t_mask = video.lower, text.lower, text.attention_mask
    for i, layer in enumerate(layers):
        v = apply_hooks(v, video.hooks, vs + i)    # both towers see the tokens the video block sees
        v_next = model.video.run_blocks(v, vs + i, vs + i + 1, context=t, context_mask=t_mask)
        t = layer(t, t_mask, context=v.x, context_mask=v.key_mask)
        v = v_next
    return apply_hooks(v, video.hooks, len(model.video.blocks)), t
