"""Shared building blocks: one attention function (torch SDPA), MLP, pre-LN block, gated cross-attention.

Every tower in evl uses these, so there is exactly one attention implementation to optimise and test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask_from_padding(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Nk) bool/int with 1 = attend → (B, 1, 1, Nk) bool mask that SDPA broadcasts over heads/queries.

    A row with no valid key at all (e.g. a video whose frames are all padding, or a padded frame in
    divided space attention) is opened to every key: some SDPA kernels return NaN for a fully masked
    row, and a NaN in a padded position still poisons masked sums and gradients. That row's output is
    padding by construction, so what it attends to does not matter.
    """
    if key_mask is None:
        return None
    mask = key_mask.to(torch.bool)
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with a fused projection, computed by `F.scaled_dot_product_attention`.

    `context=None` → self-attention on `x`. Otherwise queries come from `x` and keys/values from
    `context` (whose width may differ: `context_dim`). `key_mask` (B, Nk), 1 = attend.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        mask = attention_mask_from_padding(key_mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block (ViT style): x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask=key_mask)
        return x + self.mlp(self.norm2(x))


class GatedCrossAttention(nn.Module):
    """EgoVLPv2-style fusion module: returns the *update* gate · cross_attn(LN(x), context).

    The gate is one learnable scalar initialised to 0 (no tanh), so a tower with these modules inserted
    computes exactly what it computed without them until training moves the gate. Callers add the
    returned update where the paper adds it (video: after spatial attention; text: after self-attention).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, num_heads, context_dim=context_dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.gate * self.attn(self.norm(x), context=context, key_mask=context_mask)


class LogitScale(nn.Module):
    """Learnable inverse temperature, CLIP-style: stored as a log so it stays positive and moves
    multiplicatively; the value is clamped at ``max_scale`` (100) so logits cannot blow up.

    ``forward()`` returns the scale (a 0-dim tensor), not its log. Above the clamp the gradient is 0,
    which, like CLIP's clamp after each step, stops the temperature from sharpening further.
    """

    def __init__(self, init_scale: float = 1 / 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if init_scale <= 0 or max_scale <= 0:
            raise ValueError(f"logit scale must be positive, got init={init_scale}, max={max_scale}")
        self.max_scale = float(max_scale)
        # shape (1,), not 0-dim: FSDP2's fully_shard refuses scalar parameters
        self.log_scale = nn.Parameter(torch.tensor([math.log(init_scale)]), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale).squeeze(0)
