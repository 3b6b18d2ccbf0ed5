"""Find the parameters a training objective never sends a gradient to, by running it once.

DDP waits in every step for a gradient of every trainable parameter; one that never gets one (the
MLM head when no term uses MLM, the last fused video block when only MLM reads the fused path) stalls
the reduction or raises. Rules by parameter name go stale as soon as a technique adds a module, so
evl *measures* instead: one forward/backward of the objective on a small real batch, and the
trainable parameters whose `.grad` is still None are the gradient-free ones. (A parameter that is in
the graph with a zero gradient — a fusion module behind a gate at 0 — does get a gradient tensor and
stays trainable, as it must: the gate moves it off zero.)

The probe leaves no trace: module state (parameters and buffers, e.g. a codebook's EMA statistics)
and every RNG stream are restored, and gradients are cleared.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def gradient_free_parameters(module: nn.Module, run: Callable[[], torch.Tensor]) -> list[str]:
    """Names of trainable parameters of `module` that `run()` (returning the loss) leaves without
    gradient. `module` is left exactly as it was."""
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not trainable:
        return []
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {n: p.grad for n, p in trainable.items()}
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        for p in trainable.values():
            p.grad = None
        run().float().backward()
        return [n for n, p in trainable.items() if p.grad is None]
    finally:
        for n, p in trainable.items():
            p.grad = grads[n]
        with torch.no_grad():
            module.load_state_dict(state)
        torch.random.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def freeze_gradient_free(module: nn.Module, run: Callable[[], torch.Tensor]) -> list[str]:
    """Freeze (requires_grad=False) what `gradient_free_parameters` finds; returns their names."""
    names = gradient_free_parameters(module, run)
    params = dict(module.named_parameters())
    for n in names:
        params[n].requires_grad_(False)
    return names
