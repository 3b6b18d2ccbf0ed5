"""Importing VideoMAE weights (Hugging Face or the original MCG-NJU layout) into evl's `VideoEncoder`.

Build the encoder with `VideoEncoderConfig.from_videomae(hf_config)`, then `load_videomae_state_dict`:
keys are mapped by name, q/k/v fused, the heads and pre-training parts reported and left out, and any
tensor of another shape is an error naming both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evl.errors import CheckpointError
from evl.models.video import VideoEncoder

# HF VideoMAE keys (after stripping "videomae.") → evl; per-layer suffixes under encoder.layer.{i}.
_HF_LAYER = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
# Original MCG-NJU VideoMAE keys (after stripping "encoder."), per block under blocks.{i}.
_ORIG_LAYER = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2"}
# Heads and pre-training parts that are not the encoder: reported, never loaded.
_IGNORED_PREFIXES = ("fc_norm.", "classifier.", "head.", "decoder.", "encoder_to_decoder.", "mask_token",
                     "pos_embed", "embeddings.position_embeddings")


@dataclass
class VideoMAELoadReport:
    """What `load_videomae_state_dict` did: evl keys left at init, checkpoint keys not used (heads)."""

    missing: list[str]
    ignored: list[str]


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefixes: HF `videomae.` (task models), original pre-training `encoder.`."""
    if any(k.startswith("videomae.") for k in state_dict):
        state_dict = {k.removeprefix("videomae."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.blocks.") for k in state_dict):
        state_dict = {k.removeprefix("encoder."): v for k, v in state_dict.items()}
    return state_dict


def videomae_to_evl(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a HF (`VideoMAEModel`/`...ForVideoClassification`/`...ForPreTraining`) or original VideoMAE
    state dict to evl key names. Returns (mapped, ignored keys). Unknown keys raise CheckpointError.

    VideoMAE has no key bias: q and v biases (HF `query.bias`/`value.bias`, or older `q_bias`/`v_bias`)
    are fused into evl's qkv bias with a zero k part, which is the same function.
    """
    sd = _strip_prefix(dict(state_dict))
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key.startswith("embeddings.patch_embeddings.projection.") or key.startswith("patch_embed.proj."):
            out[f"patch_embed.{parts[-1]}"] = value
        elif key in ("layernorm.weight", "layernorm.bias", "norm.weight", "norm.bias"):
            out[f"norm.{parts[-1]}"] = value
        elif key.startswith("encoder.layer.") or key.startswith("blocks."):
            hf = key.startswith("encoder.layer.")
            idx = int(parts[2] if hf else parts[1])
            sub = ".".join(parts[3:] if hf else parts[2:])
            if not _map_layer_key(out, qkv.setdefault(idx, {}), idx, sub, value, hf):
                raise CheckpointError(f"VideoMAE checkpoint key {key!r} is not recognised (layer {idx}, {sub!r})")
        elif key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
        else:
            raise CheckpointError(f"VideoMAE checkpoint key {key!r} is not part of a VideoMAE encoder; "
                                  "pass the encoder's state dict (or VideoMAEModel/…ForVideoClassification)")
    for idx, parts_ in qkv.items():
        _fuse_qkv(out, idx, parts_)
    return out, ignored


def _map_layer_key(out: dict[str, torch.Tensor], qkv: dict[str, torch.Tensor], idx: int, sub: str,
                   value: torch.Tensor, hf: bool) -> bool:
    """One per-layer key; q/k/v pieces are collected in `qkv` and fused later. False = unknown key."""
    if hf and sub.startswith("attention.attention."):
        name = sub.removeprefix("attention.attention.")
        aliases = {"query.weight": "qw", "key.weight": "kw", "value.weight": "vw", "query.bias": "qb",
                   "value.bias": "vb", "q_bias": "qb", "v_bias": "vb", "key.bias": "kb"}
        if name not in aliases:
            return False
        qkv[aliases[name]] = value
        return True
    if not hf and sub in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.qkv.bias"):
        qkv[{"attn.qkv.weight": "w", "attn.q_bias": "qb", "attn.v_bias": "vb", "attn.qkv.bias": "b"}[sub]] = value
        return True
    table = _HF_LAYER if hf else _ORIG_LAYER
    for src, dst in table.items():
        if sub.startswith(src + "."):
            out[f"blocks.{idx}.{dst}.{sub.removeprefix(src + '.')}"] = value
            return True
    return False


def _fuse_qkv(out: dict[str, torch.Tensor], idx: int, p: dict[str, torch.Tensor]) -> None:
    weight = p["w"] if "w" in p else torch.cat([p["qw"], p["kw"], p["vw"]], dim=0)
    out[f"blocks.{idx}.attn.qkv.weight"] = weight
    if "b" in p:
        out[f"blocks.{idx}.attn.qkv.bias"] = p["b"]
    elif "qb" in p or "vb" in p:
        dim = weight.shape[0] // 3
        zeros = weight.new_zeros(dim)
        out[f"blocks.{idx}.attn.qkv.bias"] = torch.cat([p.get("qb", zeros), p.get("kb", zeros), p.get("vb", zeros)])


def load_videomae_state_dict(encoder: VideoEncoder, state_dict: dict[str, torch.Tensor],
                             strict: bool = True) -> VideoMAELoadReport:
    """Load VideoMAE weights (HF or original layout) into `encoder` (build it with `from_videomae`).

    strict=True: every evl parameter must come from the checkpoint — an encoder with parts VideoMAE
    lacks (CLS token, learned positions, divided time attention, fusion) then raises CheckpointError
    listing them; pass strict=False to keep those at their initialisation (e.g. a TimeSformer or a
    fusion tower started from VideoMAE). Shape mismatches always raise.
    """
    mapped, ignored = videomae_to_evl(state_dict)
    own = encoder.state_dict()
    if "blocks.0.attn.qkv.bias" in own and "blocks.0.attn.qkv.weight" in mapped:
        for i in range(len(encoder.blocks)):
            key = f"blocks.{i}.attn.qkv.bias"
            if key not in mapped and f"blocks.{i}.attn.qkv.weight" in mapped:
                mapped[key] = torch.zeros_like(own[key])  # checkpoint without q/v bias (qv_bias=False)
    unexpected = sorted(set(mapped) - set(own))
    if unexpected:
        raise CheckpointError(f"VideoMAE weights do not fit this encoder; unexpected keys: {unexpected[:8]}"
                              f"{' …' if len(unexpected) > 8 else ''} — build it with "
                              "VideoEncoderConfig.from_videomae(hf_config) (final_norm, qkv_bias, num_layers)")
    for key, value in mapped.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(f"VideoMAE key for {key!r} has shape {tuple(value.shape)}, encoder expects "
                                  f"{tuple(own[key].shape)}; build the encoder with VideoEncoderConfig.from_videomae")
    # the mask token is evl's own (masked video modelling); VideoMAE's encoder has none
    missing = sorted(set(own) - set(mapped) - {"mask_token"})
    if missing and strict:
        raise CheckpointError(f"VideoMAE checkpoint lacks {len(missing)} encoder keys: {missing[:8]}"
                              f"{' …' if len(missing) > 8 else ''}; use strict=False to keep them at init")
    encoder.load_state_dict(mapped, strict=False)
    return VideoMAELoadReport(missing=missing, ignored=sorted(ignored))

