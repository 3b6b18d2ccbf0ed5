"""BERT-compatible text encoder, loadable from Hugging Face BERT safetensors (default: packaged MiniLM-L6).

Why a re-implementation instead of `transformers.BertModel`: evl needs (1) the one attention function of
`evl.models.layers` (SDPA, fused qkv) in every tower, (2) EgoVLPv2 fusion-in-the-backbone — a gated
cross-attention to video tokens inside the top layers — and (3) layer-by-layer access so a fusion wrapper
can run the text and video towers in lockstep. The module names differ from HF's, so weights are imported
by an explicit key mapping (`hf_bert_to_evl`), strictly: a key that does not fit is an error, not a warning.

Layout (post-LN, as in BERT)::

    x = LN(word_emb + pos_emb + type_emb)
    per layer:  a = x + SelfAttn(x)
                a = a + gate · CrossAttn(LN'(a), video)        # only top `fusion_layers`, only when video given
                x = LN1(a);  x = LN2(x + FFN(x))

The cross-attention query is the residual stream after self-attention (normalised by the fusion module's
own LayerNorm), which is what EgoVLPv2's code queries with; its update is added before the residual
LayerNorm, so with the gate at its initial 0 the fused tower equals the plain one exactly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evl.checkpoint import resolve_pretrained
from evl.config import MAX_COUNT, MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, check_range, from_dict
from evl.errors import CheckpointError, ConfigError
from evl.models.layers import MLP, GatedCrossAttention, MultiHeadAttention

# Checkpoint keys that exist in HF BERT files but have no counterpart here, on purpose:
# the pooler (evl pools itself), the position-id buffer, and pre-training heads (`cls.*`).
IGNORED_PREFIXES = ("pooler.", "cls.")
IGNORED_KEYS = ("embeddings.position_ids",)
# Wrappers that HF / sentence-transformers put in front of the BERT keys.
TOLERATED_PREFIXES = ("bert.", "model.", "0.auto_model.", "auto_model.", "encoder_model.")


# ------------------------------------------------------------------------------------------- config


@dataclass
class TextEncoderConfig:
    """Architecture of the text tower. Defaults are all-MiniLM-L6-v2's, so `pretrained: minilm` needs
    nothing else (add `num_layers: 2` for a cheap tower made of its first two layers).

    `pretrained`: "minilm" (packaged weights), a folder with HF BERT safetensors, or None (random init).
    `tokenizer`: where the tokenizer.json comes from; None = the `pretrained` source (else MiniLM's).
    Training records the resolved source in the checkpoint's config, so evaluation tokenizes with the
    ids the weights were trained on.
    `fusion_layers`: how many of the top layers get a gated cross-attention to video tokens of width
    `context_dim` (EgoVLPv2); 0 = a plain text encoder.
    `locked_layers`: the embeddings and the first N layers are locked (LiT; open_clip's `--lock-text`
    with `--lock-text-unlocked-layers`): not trained, always run in eval mode (no dropout), and in
    training their output is cached per token sequence (up to `locked_cache` sequences), so a caption
    seen again in a later epoch costs nothing below the unlocked layers. N = num_layers locks the whole
    tower (only the projection above it trains); 0 = nothing locked. Fused layers cannot be locked.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pretrained: str | None = "minilm"
    tokenizer: str | None = None
    fusion_layers: int = 0
    context_dim: int | None = None
    locked_layers: int = 0
    locked_cache: int = 4096

    @property
    def first_fused_layer(self) -> int:
        """Index of the first layer with cross-attention to the other modality (= num_layers: none);
        the one definition every user of the fused layers reads (the towers, the model, backbone fusion)."""
        return self.num_layers - self.fusion_layers

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"text.hidden_size {self.hidden_size} is not divisible by text.num_heads {self.num_heads}")
        for name, high in (("vocab_size", MAX_COUNT), ("hidden_size", MAX_WIDTH), ("intermediate_size", 4 * MAX_WIDTH),
                           ("num_layers", MAX_LAYERS), ("max_position_embeddings", MAX_POSITIONS),
                           ("type_vocab_size", 16)):
            check_range(f"text.{name}", getattr(self, name), 1, high)
        check_range("text.dropout", self.dropout, 0, 0.999)
        check_range("text.attention_dropout", self.attention_dropout, 0, 0.999)
        check_range("text.layer_norm_eps", self.layer_norm_eps, 1e-12, 1)
        if not 0 <= self.fusion_layers <= self.num_layers:
            raise ConfigError(
                f"text.fusion_layers must be between 0 and text.num_layers ({self.num_layers}), got {self.fusion_layers}"
            )
        if self.fusion_layers and not self.context_dim:
            raise ConfigError("text.fusion_layers > 0 needs text.context_dim (the video tower's width)")
        if not 0 <= self.locked_layers <= self.num_layers - self.fusion_layers:
            raise ConfigError(
                f"text.locked_layers must be between 0 and text.num_layers - text.fusion_layers "
                f"({self.num_layers} - {self.fusion_layers}: fused layers cannot be locked), got {self.locked_layers}"
            )
        if self.locked_cache < 0:
            raise ConfigError(f"text.locked_cache must be >= 0 sequences (0 = no cache), got {self.locked_cache}")
        check_range("text.locked_cache", self.locked_cache, 0, MAX_COUNT, " cached sequences (0 = no cache)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEncoderConfig:
        return from_dict(cls, data, where="text")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> TextEncoderConfig:
        """From a HF BERT `config.json` dict; `overrides` set evl-only fields (pretrained, fusion, ...)."""
        act = hf.get("hidden_act", "gelu")
        pos = hf.get("position_embedding_type", "absolute")
        if act != "gelu" or pos != "absolute":
            raise CheckpointError(
                f"only BERT with hidden_act='gelu' and absolute positions is supported, got hidden_act={act!r}, "
                f"position_embedding_type={pos!r}"
            )
        try:
            fields = dict(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            )
        except KeyError as e:
            raise CheckpointError(f"BERT config.json lacks key {e.args[0]!r}") from None
        fields.update({k: v for k, v in overrides.items() if v is not None or k == "pretrained"})
        return cls(**fields)


# Fields a checkpoint fixes; `num_layers` may be smaller (keep the first N layers).
_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_position_embeddings",
                "type_vocab_size", "layer_norm_eps")


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json (a HF BERT checkpoint folder needs one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def check_matches_checkpoint(cfg: TextEncoderConfig, ckpt: TextEncoderConfig, folder: Path) -> None:
    """The config must describe the checkpoint's architecture; say which fields differ and how to fix it."""
    diffs = [f"{n}={getattr(cfg, n)} (checkpoint: {getattr(ckpt, n)})"
             for n in _ARCH_FIELDS if getattr(cfg, n) != getattr(ckpt, n)]
    if cfg.num_layers > ckpt.num_layers:
        diffs.append(f"num_layers={cfg.num_layers} (checkpoint has only {ckpt.num_layers})")
    if diffs:
        raise CheckpointError(
            f"text config does not match the checkpoint in {folder}: {', '.join(diffs)}. "
            "Remove these keys from the text config, or set text.pretrained to null for random initialisation."
        )


# ------------------------------------------------------------------------------------------- model


@dataclass
class TextEncoderOutput:
    """`tokens` (B,L,D) last hidden states; `cls` = tokens[:,0]; `mean` = mean over real (mask=1) tokens."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    cls: torch.Tensor
    mean: torch.Tensor


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions with mask=1 (sentence-transformers' pooling; the clamp avoids 0/0)."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {length} tokens exceeds the encoder's {self.position_embeddings.num_embeddings} positions; "
                "tokenize with a smaller max_length"
            )
        pos = torch.arange(length, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class TextLayer(nn.Module):
    """One post-LN BERT layer, optionally with an EgoVLPv2 gated cross-attention (`fusion=True`)."""

    def __init__(self, cfg: TextEncoderConfig, fusion: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.attn = MultiHeadAttention(d, cfg.num_heads, qkv_bias=True, dropout=cfg.attention_dropout)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, dropout=cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.cross_attn = GatedCrossAttention(d, cfg.context_dim, cfg.num_heads) if fusion else None

    @property
    def has_fusion(self) -> bool:
        return self.cross_attn is not None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`context=None` (or a layer without fusion) → the plain BERT layer (dual-encoder mode)."""
        a = x + self.attn_dropout(self.attn(x, key_mask=attention_mask))
        if self.cross_attn is not None and context is not None:
            a = a + self.cross_attn(a, context, context_mask)
        x = self.norm1(a)
        return self.norm2(x + self.mlp(x))


class RowCache:
    """Least-recently-used outputs of a deterministic function of token rows, keyed by each row's ids and
    mask (at most `capacity` rows). Rows not cached are computed together in one call; the rest are read."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.rows.clear()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor,
                 compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.capacity == 0:
            return compute(ids, mask)
        table = torch.cat([ids, mask], dim=1).cpu().numpy()
        keys = [row.tobytes() for row in table]
        todo = list(dict.fromkeys(k for k in keys if k not in self.rows))
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            first = [keys.index(k) for k in todo]
            out = compute(ids[first], mask[first])
            fresh = {k: out[j].clone() for j, k in enumerate(todo)}
        rows = [fresh.get(k) if k in fresh else self.rows[k] for k in keys]
        for k in keys:   # most recently used last; the least recently used go first
            if k in fresh:
                self.rows[k] = fresh[k]
            self.rows.move_to_end(k)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return torch.stack(rows)


class TextEncoder(nn.Module):
    """BERT-compatible encoder. Built from `cfg`; when `cfg.pretrained` is set the weights are loaded
    right away (strictly), so `TextEncoder(cfg)` is the one construction path for configs and recipes.

    Lockstep API for fusion (`evl.techniques.egovlpv2.fusion.run_lockstep`): `embed(input_ids)`, then
    `layers[i](x, attention_mask, context, context_mask)`; layers from index `cfg.first_fused_layer` on have
    cross-attention. `forward` is the dual-mode tower. There is no final norm.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(TextLayer(cfg, fusion=i >= cfg.first_fused_layer) for i in range(cfg.num_layers))
        self.apply(self._init_weights)
        if cfg.pretrained is not None:
            self.load_pretrained(cfg.pretrained)
        self._locked_cache = RowCache(cfg.locked_cache)
        for p in self._locked_modules().parameters():
            p.requires_grad_(False)
        # new weights make every cached output stale
        self.register_load_state_dict_post_hook(lambda module, keys: module._locked_cache.clear())

    def _locked_modules(self) -> nn.ModuleList:
        n = self.cfg.locked_layers
        return nn.ModuleList([self.embeddings, *self.layers[:n]] if n else [])

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self._locked_modules().eval()   # locked: no dropout, whatever the mode
        return self

    def _run_locked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers[:self.cfg.locked_layers]:
            x = layer(x, attention_mask)
        return x

    def unlocked_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(hidden states entering the first unlocked layer, that layer's index): the embeddings and 0
        without a lock; otherwise the locked part's output, computed without gradient and, in training,
        read from the cache where the same token sequence was seen before."""
        n = self.cfg.locked_layers
        if n == 0:
            return self.embed(input_ids), 0
        with torch.no_grad():
            if self.training:
                return self._locked_cache(input_ids, attention_mask, self._run_locked), n
            return self._run_locked(input_ids, attention_mask), n

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """BERT's initialisation (normal(0, 0.02)); LayerNorms stay at (1, 0), fusion gates at 0."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    @classmethod
    def from_pretrained(cls, folder_or_name: str | Path = "minilm", num_layers: int | None = None,
                        fusion_layers: int = 0, context_dim: int | None = None, **overrides: Any) -> TextEncoder:
        """Architecture from the folder's config.json, weights from its model.safetensors.

        `num_layers` below the checkpoint's keeps its first N layers (a cheap tower from real weights).
        """
        folder = resolve_pretrained(folder_or_name)
        cfg = TextEncoderConfig.from_hf(
            read_hf_config(folder), pretrained=str(folder_or_name), num_layers=num_layers,
            fusion_layers=fusion_layers, context_dim=context_dim, **overrides,
        )
        return cls(cfg)

    def load_pretrained(self, folder_or_name: str | Path) -> None:
        """Load HF BERT safetensors into this encoder (strict; fusion parameters keep their init)."""
        folder = resolve_pretrained(folder_or_name)
        ckpt_cfg = TextEncoderConfig.from_hf(read_hf_config(folder), pretrained=None)
        check_matches_checkpoint(self.cfg, ckpt_cfg, folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(
                f"{folder} has no model.safetensors (evl never unpickles .bin files; convert with "
                "`safetensors`' save_file first)"
            )
        from safetensors.torch import load_file

        state = hf_bert_to_evl(load_file(str(weights)), num_layers=self.cfg.num_layers, source=str(weights))
        load_strict(self, state, allowed_missing=lambda k: ".cross_attn." in k, source=str(weights))
        if hasattr(self, "_locked_cache"):
            self._locked_cache.clear()

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.embeddings(input_ids, token_type_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> TextEncoderOutput:
        """The plain text tower (dual mode: the fused layers' cross-attention is skipped)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            x, first = self.unlocked_input(input_ids, attention_mask)
        else:   # token types are not part of the locked cache's key: run the whole tower
            x, first = self.embed(input_ids, token_type_ids), 0
        for layer in self.layers[first:]:
            x = layer(x, attention_mask)
        return TextEncoderOutput(tokens=x, attention_mask=attention_mask, cls=x[:, 0], mean=masked_mean(x, attention_mask))


# ------------------------------------------------------------------------------------ weight import

_LAYER_MAP = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_EMB_MAP = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop one wrapper prefix (`bert.`, ...) if the BERT keys carry it."""
    for prefix in TOLERATED_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def hf_bert_to_evl(state: dict[str, torch.Tensor], num_layers: int, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename HF BERT keys to evl's; query/key/value are concatenated into the fused `qkv`.

    Layers at index >= `num_layers` are dropped (truncated tower); pooler / heads / position_ids ignored.
    Keys that match nothing are kept under their own name, so the strict load reports them.
    """
    state = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        if key in _EMB_MAP:
            out[_EMB_MAP[key]] = value
            continue
        parts = key.split(".")
        if key.startswith("encoder.layer.") and len(parts) > 3 and parts[2].isdigit():
            idx, rest = int(parts[2]), ".".join(parts[3:])
            if idx >= num_layers:
                continue
            sub, _, leaf = rest.rpartition(".")
            if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault((idx, leaf), {})[sub.rsplit(".", 1)[1]] = value
                continue
            if sub in _LAYER_MAP:
                out[f"layers.{idx}.{_LAYER_MAP[sub]}.{leaf}"] = value
                continue
        out[key] = value  # unknown: reported as unexpected by load_strict
    for (idx, leaf), parts_ in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts_]
        if missing:
            raise CheckpointError(
                f"{source}: layer {idx} attention {leaf} lacks {', '.join(missing)} (a BERT checkpoint has all three)"
            )
        out[f"layers.{idx}.attn.qkv.{leaf}"] = torch.cat([parts_["query"], parts_["key"], parts_["value"]], dim=0)
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], allowed_missing=lambda key: False,
                source: str = "checkpoint") -> None:
    """`load_state_dict` that raises CheckpointError listing every missing / unexpected / mis-shaped key."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not allowed_missing(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the text encoder:"]
        if missing:
            lines.append(f"  missing keys: {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {'; '.join(shapes)}")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))

