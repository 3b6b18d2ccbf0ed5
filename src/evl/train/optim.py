"""Optimizer parameter groups and the learning-rate schedule (pure functions, easy to test).

The schedule is a function of the step number alone — no scheduler object with hidden state — so
resuming only needs the step count, and the learning rate at any step can be checked by hand.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from evl.errors import ConfigError

__all__ = ["build_param_groups", "lr_factor", "lr_multiplier", "no_weight_decay", "no_weight_decay_names"]


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


def no_weight_decay(name: str, param: nn.Parameter, extra: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether a parameter is excluded from weight decay.

    Rule: every parameter with fewer than 2 dimensions — biases, LayerNorm/BatchNorm scales and
    shifts, scalar or per-channel gates (EgoVLPv2's cross-attention gates), temperatures — plus any
    name ending in "bias", plus the names in `extra` (what modules list in `no_weight_decay()`: CLS
    and mask tokens, position tables, as in timm and VideoMAE). Decaying these pulls them towards 0,
    which for a norm scale or a gate means switching the layer off rather than regularising it.
    """
    return param.ndim < 2 or name.endswith("bias") or name in extra


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that modules exclude from weight decay via a `no_weight_decay()` method."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _matches(name: str, pattern: str) -> bool:
    """`pattern` names a module path, anchored at its start and at a component boundary at its end
    ("text" matches text.layers.0.… but not text_proj.…); `*` matches any run of characters, so
    "*cross_attn" matches every cross_attn module in either tower."""
    pattern = pattern.rstrip(".")
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def lr_multiplier(name: str, lr_mults: dict[str, float]) -> tuple[float, str]:
    """(multiplier, pattern) of the most specific pattern matching `name` (the longest, wildcards
    aside), or (1.0, "") when none does."""
    hits = [p for p in lr_mults if _matches(name, p)]
    if not hits:
        return 1.0, ""
    best = max(hits, key=lambda p: (len(p.replace("*", "").rstrip(".")), p))
    return float(lr_mults[best]), best


def build_param_groups(model: nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None
                       ) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (lr multiplier, decay / no decay) combination that occurs.

    `lr_mults` maps a module-path pattern to a learning-rate multiplier (EgoVLPv2 trains its new
    cross-attention and heads 4x faster: {"*cross_attn": 4.0, "*_head": 4.0}); see `_matches` for the
    pattern rule, and the most specific matching pattern wins. A module with `pattern_root = "model."`
    (the training objective) is matched by the paths below that prefix. A pattern that matches no
    parameter is an error (a typo would otherwise silently train at 1x); one that matches only frozen
    parameters (a locked tower) is not. Each group carries
    `lr_mult` and `name` so the Trainer sets `lr = base_lr * schedule * lr_mult` at every step and so
    logs say which group is which. Frozen parameters (requires_grad=False) are left out.
    """
    lr_mults = lr_mults or {}
    skip_decay = no_weight_decay_names(model)
    # a training objective holds the model under "model."; patterns name the model's own paths
    root = getattr(model, "pattern_root", "")
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    used: set[str] = set()
    for name, p in model.named_parameters():
        mult, pattern = lr_multiplier(name.removeprefix(root) if root else name, lr_mults)
        used.add(pattern)   # a pattern naming only frozen (locked) parameters is no typo
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p, skip_decay)
        key = (pattern, decay)
        if key not in groups:
            label = f"{pattern.rstrip('.') or 'base'}{'' if decay else '_no_decay'}"
            groups[key] = {"params": [], "param_names": [], "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0, "name": label}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    unused = [p for p in lr_mults if p not in used]
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise ConfigError(f"train.lr_mults: {', '.join(repr(u) for u in unused)} match(es) no parameter; "
                          f"patterns are module paths anchored at the start (use * for any prefix, e.g. "
                          f"'*cross_attn'); top-level modules: {', '.join(tops)}")
    return list(groups.values())
