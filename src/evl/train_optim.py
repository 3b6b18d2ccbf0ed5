"""Optimizer parameter groups and the learning-rate schedule (pure functions, easy to test).

The schedule is a function of the step number alone — no scheduler object with hidden state — so
resuming only needs the step count, and the learning rate at any step can be checked by hand.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["build_param_groups", "lr_factor", "no_weight_decay"]


def lr_factor(step: int, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier on the base learning rate for the optimizer update with 0-based index `step`.

    Linear warm-up: (step + 1) / warmup_steps for the first `warmup_steps` updates (so the very first
    update is not taken with lr 0). Then "constant" stays at 1; "cosine" decays from 1 towards
    `min_lr_ratio` along half a cosine that ends at step `max_steps` (just after the last update, so
    no update is wasted at lr 0): factor = min + (1 - min) * (1 + cos(pi * (step - warmup) / (max_steps - warmup))) / 2.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'constant'")
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is excluded from weight decay.

    Rule: every parameter with fewer than 2 dimensions — biases, LayerNorm/BatchNorm scales and
    shifts, scalar or per-channel gates (EgoVLPv2's cross-attention gates), temperatures — plus any
    name ending in "bias". Decaying these pulls them towards 0, which for a norm scale or a gate means
    switching the layer off rather than regularising it. Matrices and embeddings are decayed.
    """
    return param.ndim < 2 or name.endswith("bias")


def _lr_mult(name: str, lr_mults: dict[str, float]) -> tuple[float, str]:
    """First substring of `lr_mults` (in its order) found in `name` → (multiplier, substring)."""
    for sub, mult in lr_mults.items():
        if sub in name:
            return float(mult), sub
    return 1.0, ""


def build_param_groups(model: nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None
                       ) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (lr multiplier, decay / no decay) combination that occurs.

    `lr_mults` maps a parameter-name substring to a learning-rate multiplier (EgoVLPv2 trains its
    new cross-attention and heads 4x faster: {"cross": 4.0, "head": 4.0}); the first matching
    substring in dict order wins. Each group carries `lr_mult` and `name` so the Trainer can set
    `lr = base_lr * schedule * lr_mult` at every step and so logs say which group is which.
    Frozen parameters (requires_grad=False) are left out.
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult, sub = _lr_mult(name, lr_mults)
        decay = not no_weight_decay(name, p)
        key = (sub, decay)
        if key not in groups:
            label = f"{sub or 'base'}{'' if decay else '_no_decay'}"
            groups[key] = {"params": [], "param_names": [], "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0, "name": label}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())
