"""`TrainConfig`: the optimisation and bookkeeping settings of every run (a recipe's `train:` section),
checked when the recipe loads so that a bad value is an error before any step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from evl.config import MAX_WORKERS, check_range
from evl.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings. `batch_size` is the *global* batch (all ranks, all
    accumulation micro-steps); it must be divisible by world_size x grad_accum."""

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 1.0  # 0 = no clipping (the norm is still computed and logged)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 only where the hardware runs it natively
    lr_mults: dict[str, float] = field(default_factory=dict)  # module-path pattern -> lr multiplier
    ckpt_every: int = 1000  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk; 0 = all
    log_every: int = 10
    out_dir: str = "runs/train"
    seed: int = 0
    num_workers: int = 0
    max_nonfinite: int = 5
    strategy: Literal["ddp", "fsdp"] = "ddp"
    find_unused_parameters: bool = False
    device: str = "auto"  # "auto" = this rank's GPU if there is one, else CPU
    overwrite: bool = False  # a fresh run into an out_dir that holds another run's checkpoints deletes them
    max_bad_steps: int = 3  # stop when this many steps in a row had no decodable sample

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "max_nonfinite", "log_every", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "keep_last", "num_workers", "lr", "weight_decay",
                     "clip_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "eps", "clip_grad_norm", "min_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {self.betas}")
        for i, beta in enumerate(self.betas):
            check_range(f"train.betas[{i}]", beta, 0, 0.999999, " (Adam's moment decay rates, e.g. [0.9, 0.999])")
        check_range("train.eps", self.eps, 1e-30, 1, " (Adam's epsilon, e.g. 1e-8)")
        check_range("train.num_workers", self.num_workers, 0, MAX_WORKERS, " data-loading processes")
        check_range("train.seed", self.seed, -(2**63), 2**63 - 1)
        for pattern, mult in self.lr_mults.items():
            if not (math.isfinite(mult) and mult >= 0):
                raise ConfigError(f"train.lr_mults.{pattern}={mult}: an lr multiplier must be a finite number >= 0")
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty: name the folder the run writes to (e.g. train.out_dir=runs/x)")
