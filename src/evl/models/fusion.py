"""Cross-modal fusion, both kinds.

1. `CrossModalEncoder` (E-ViLM / ALBEF style): N extra BERT layers on top of the text tower; text
   tokens self-attend, then attend to the video tokens, then the feed-forward. The towers stay untouched.
2. Fusion in the backbone (EgoVLPv2): the towers' own top layers carry gated cross-attention
   (see `VideoBlock` / `TextLayer`). `run_lockstep` drives both towers through those layers together:
   each video block sees the current text tokens and each text layer the current video tokens.
   Without context the same layers are the plain towers (dual mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from evl.models.text import (
    TextEncoder,
    TextEncoderConfig,
    TextLayer,
    hf_bert_to_evl,
    load_strict,
    read_hf_config,
    resolve_pretrained,
)


@dataclass
class FusionConfig:
    """`kind`: "encoder" (separate cross-modal encoder), "backbone" (EgoVLPv2) or "none" (dual only).

    `num_layers`: cross-modal layers (encoder) or fused top layers in *each* tower (backbone).
    `num_heads`: heads of the encoder's layers (default: the text tower's); backbone fusion uses the
    towers' own. `init_from_text` (encoder, ALBEF-style): when the text tower starts from a pre-trained
    checkpoint, the cross-modal layers start from that checkpoint's layers that follow the ones the text
    tower uses (e.g. MiniLM layers 3–4 after a 2-layer text tower) instead of from random weights;
    it has no effect on the other kinds (backbone fusion already sits in pre-trained layers).
    """

    kind: Literal["encoder", "backbone", "none"] = "encoder"
    num_layers: int = 2
    num_heads: int | None = None
    init_from_text: bool = False

    def __post_init__(self) -> None:
        if self.kind != "none" and self.num_layers < 1:
            raise ValueError(f"fusion.num_layers must be >= 1 for fusion kind {self.kind!r}; got {self.num_layers}")


class CrossModalEncoder(nn.Module):
    """Text tokens (B, L, Dt) attend to video tokens (B, N, Dv) through `num_layers` BERT layers, each
    with a cross-attention after its self-attention (ALBEF's fusion encoder).

    The layers are the text tower's own layer type (post-LN, same width), so they can start from a
    pre-trained text checkpoint; their cross-attention gates start open (1), unlike EgoVLPv2's
    in-backbone gates, because here nothing is to be preserved at initialisation.
    """

    def __init__(self, text_cfg: TextEncoderConfig, video_dim: int, cfg: FusionConfig):
        super().__init__()
        heads = cfg.num_heads or text_cfg.num_heads
        layer_cfg = dataclasses.replace(text_cfg, num_layers=cfg.num_layers, num_heads=heads,
                                        fusion_layers=cfg.num_layers, context_dim=video_dim, pretrained=None)
        self.layers = nn.ModuleList(TextLayer(layer_cfg, fusion=True) for _ in range(cfg.num_layers))
        self.apply(TextEncoder._init_weights)
        with torch.no_grad():
            for layer in self.layers:
                layer.xattn.gate.fill_(1.0)
        if cfg.init_from_text and text_cfg.pretrained is not None:
            self.load_text_layers(text_cfg.pretrained, first=text_cfg.num_layers, heads_must_match=heads == text_cfg.num_heads)

    def load_text_layers(self, checkpoint: str, first: int, heads_must_match: bool = True) -> None:
        """Self-attention and feed-forward weights from layers first.. of a BERT checkpoint (strict;
        the cross-attention keeps its initialisation)."""
        from safetensors.torch import load_file

        from evl.errors import CheckpointError

        if not heads_must_match:
            raise CheckpointError("fusion.init_from_text needs fusion.num_heads equal to the text tower's heads "
                                  "(or unset): pre-trained attention weights are split per head")
        folder = resolve_pretrained(checkpoint)
        ckpt_layers = int(read_hf_config(folder)["num_hidden_layers"])
        n = len(self.layers)
        if first + n > ckpt_layers:
            raise CheckpointError(f"fusion.init_from_text: the text tower uses {first} of {folder}'s {ckpt_layers} "
                                  f"layers, so {n} fusion layers would need layers {first}..{first + n - 1}; "
                                  "use fewer text or fusion layers, or set fusion.init_from_text=false")
        state = hf_bert_to_evl(load_file(str(folder / "model.safetensors")), num_layers=first + n, source=str(folder))
        ours = {}
        for key, value in state.items():
            if key.startswith("layers."):
                idx, rest = key.split(".", 2)[1:]
                if int(idx) >= first:
                    ours[f"layers.{int(idx) - first}.{rest}"] = value
        load_strict(self, ours, allowed_missing=lambda k: ".xattn." in k, source=f"{folder} (layers {first}..)")

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            text = layer(text, text_mask, video, video_mask)
        return text


def run_lockstep(video_blocks: nn.ModuleList, text_layers: nn.ModuleList, v: torch.Tensor,
                 v_mask: torch.Tensor | None, t: torch.Tensor, t_mask: torch.Tensor,
                 time_slots: int, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused top layers of both towers; `fuse=False` is dual mode (no cross-attention).

    Both updates in a step read the *previous* states of the other tower, so the result does not
    depend on which tower is stepped first.
    """
    if len(video_blocks) != len(text_layers):
        raise ValueError(f"backbone fusion needs the same number of fused layers in both towers; "
                         f"got video {len(video_blocks)} and text {len(text_layers)}")
    for vb, tl in zip(video_blocks, text_layers, strict=True):
        v_ctx, t_ctx = (t, v) if fuse else (None, None)
        v_next = vb(v, v_mask, context=v_ctx, context_mask=t_mask if fuse else None, time_slots=time_slots)
        t = tl(t, t_mask, context=t_ctx, context_mask=v_mask if fuse else None)
        v = v_next
    return v, t
