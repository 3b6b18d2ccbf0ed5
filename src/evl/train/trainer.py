"""The Trainer: one training loop for every model and objective in evl.

It is generic on purpose: it trains any `nn.Module` with a `loss_fn(model, batch) -> dict` whose
"loss" entry is optimised (the other scalar entries are logged), on any map-style torch Dataset.
The same loop runs in one process and under `torchrun` (DDP, or FSDP2 for large models).

What it guarantees, and how (details in the helper modules):

* the global batch is `batch_size` = per-rank micro-batch x world size x grad_accum, and a 2-rank run
  sees exactly the samples of a 1-rank run (`train.data.GlobalBatchSampler`); the logged loss is
  all-reduced, so it is the global-batch loss whatever the number of ranks;
* `fit(resume=True)` continues exactly: weights, optimizer, RNG and data position are restored from
  atomic, pickle-free checkpoints (`train.state`), and data-side randomness is seeded per sample;
* bad samples (None from the dataset) are dropped and counted, never a crash; a non-finite loss or
  gradient skips the update, names the videos, and stops the run after `max_nonfinite` in a row.

Under torchrun the Trainer joins the process group from the environment and destroys it at the end
of `fit` — unless the caller created it, in which case it is left open.

Parameters that the training objective never sends a gradient to (the MLM head when no loss term
uses it, the last fused block's cross-attention with MLM alone) would stall DDP's gradient
reduction. They are *found*, not guessed: before wrapping, one probe forward/backward on a small real
batch lists the trainable parameters whose gradient stays None, and those are frozen
(`freeze_gradient_free`). The probe restores the RNG and the module state afterwards, so the run is
the same as without it. `find_unused_parameters` (DDP) stays False: it costs a graph traversal every
step; DDP's error for a model whose used parameters change from step to step is re-raised with advice.

Precision: `train.precision: auto` (the default) picks bf16 autocast only where the hardware runs it
natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and fp32 elsewhere: on other CPUs a
bf16 matmul is emulated and slower (~6x on AVX512, ~100x on AVX2). The choice and the reason are
printed and recorded in each checkpoint's trainer state.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from evl.config import to_dict
from evl.errors import ConfigError, EvlError
from evl.train.config import TrainConfig
from evl.train.data import (
    CollatedBatch,
    GlobalBatchSampler,
    dataset_size,
    make_probe_batch,
    make_train_loader,
    skip_none_collate,
)
from evl.train.dist import DistContext, init_distributed, no_sync, unwrap_model, wrap_model
from evl.train.log import MetricsLogger
from evl.train.optim import build_param_groups, lr_factor
from evl.train.state import (
    Progress,
    check_out_dir,
    clear_checkpoints,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)

__all__ = [
    "Callback",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "latest_checkpoint",
    "skip_none_collate",
    "unwrap_model",
]

LossFn = Callable[[nn.Module, Any], dict[str, Any]]


class NonFiniteLossError(EvlError):
    """Training produced NaN/inf losses or gradients `max_nonfinite` steps in a row."""


class UnreadableDataError(EvlError):
    """`max_bad_steps` steps in a row had no sample whose video decodes: the run would train nothing."""


SKIP_WARN_RATE = 0.1  # a run that has skipped more than this fraction of its samples is told so, loudly


@dataclass
class TrainResult:
    """What `fit` did. `history` has one record per optimizer step run by this call."""

    steps: int
    final_losses: dict[str, float]
    history: list[dict[str, Any]]
    skipped_samples: int
    nonfinite_steps: int
    wall_time_s: float
    checkpoint_dir: str | None = None


class Callback:
    """Hooks called on every rank. Subclass and override what you need."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each optimizer step (and after that step's checkpoint, if one was due)."""

    def on_checkpoint_staged(self, trainer: Trainer, staged: Path) -> None:
        """Main rank only: the checkpoint is written into `staged` and not yet committed (latest.json
        still points at the previous one). Files added here are part of the checkpoint."""

    def on_checkpoint(self, trainer: Trainer, path: str) -> None:
        """After a checkpoint directory has been committed."""


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        moved = [_to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def _scalars(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The scalar entries of a loss dict, detached, as float tensors (logged, never optimised)."""
    res = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            res[k] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            res[k] = torch.tensor(float(v))
    return res


def _video_names(batch: Any) -> list[str]:
    names = batch.get("video_names") if isinstance(batch, dict) else None
    return [str(n) for n in names] if names is not None else []


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        return to_dict(cfg)
    return dict(cfg) if isinstance(cfg, dict) else {}


class Trainer:
    """Trains `model` on `dataset` with `loss_fn`; see the module docstring for the guarantees.

    `collate_fn` turns a list of samples into a batch (torch's default collate if None); it is wrapped
    by :func:`skip_none_collate`. `param_groups_fn(model, cfg)` may replace the default AdamW groups
    (:func:`evl.train.optim.build_param_groups`); each group may carry `lr_mult`. `model_config` is
    saved as config.json beside the weights (default: `model.config` if it is a dataclass or dict).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Dataset, cfg: TrainConfig,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 param_groups_fn: Callable[[nn.Module, TrainConfig], list[dict[str, Any]]] | None = None,
                 callbacks: Sequence[Callback] | None = None, model_config: dict[str, Any] | None = None):
        if isinstance(dataset, IterableDataset):
            raise ConfigError("Trainer needs a map-style Dataset (with __len__/__getitem__) so that it can "
                              "shard, shuffle and resume deterministically; got an IterableDataset. Streamed data "
                              "goes through tar shards (`evl shard`; evl.data.shard_stream.ShardStream), which "
                              "resume exactly")
        self.model = model
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.cfg = cfg
        self.collate_fn = collate_fn
        self.param_groups_fn = param_groups_fn
        self.callbacks = list(callbacks or [])
        self.model_config = model_config if model_config is not None else _model_config(model)
        self.ctx = DistContext()
        self.wrapped: nn.Module = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.frozen: list[str] = []
        self.logger: MetricsLogger | None = None

    # ------------------------------------------------------------------------------------- setup

    def _micro_batch(self) -> int:
        per = self.ctx.world_size * self.cfg.grad_accum
        if self.cfg.batch_size % per:
            raise ConfigError(f"train.batch_size={self.cfg.batch_size} must be divisible by world size "
                              f"x grad_accum = {self.ctx.world_size} x {self.cfg.grad_accum} = {per}")
        if len(self.dataset) < self.cfg.batch_size:  # type: ignore[arg-type]
            raise ConfigError(f"the dataset has {len(self.dataset)} samples, fewer than one global batch "  # type: ignore[arg-type]
                              f"(train.batch_size={self.cfg.batch_size}); lower batch_size")
        return self.cfg.batch_size // per

    def _setup(self) -> None:
        from evl.precision import resolve_precision

        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.ctx.rank)  # dropout stream; each rank its own
        random.seed(cfg.seed + self.ctx.rank)
        np.random.seed((cfg.seed + self.ctx.rank) % 2**32)
        self.model.train()
        self.precision = resolve_precision(cfg.precision, self.ctx.device)
        self._dtype = self.precision.autocast_dtype
        self._probe_unused()
        self.wrapped = wrap_model(self.model, self.ctx, cfg.strategy, cfg.find_unused_parameters)
        inner = unwrap_model(self.wrapped)
        groups = (self.param_groups_fn(inner, cfg) if self.param_groups_fn
                  else build_param_groups(inner, cfg.weight_decay, cfg.lr_mults))
        for g in groups:
            g.setdefault("lr_mult", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)

    def _probe_unused(self) -> None:
        """Freeze what no loss reaches (see the module docstring), from a probe on the first two
        samples. It runs in one process too, so the optimiser's parameter groups are the same however
        the run is launched and a checkpoint resumes under torchrun or without it."""
        from evl.train.probe import freeze_gradient_free

        n = min(len(self.dataset), 2)  # type: ignore[arg-type]
        batch = make_probe_batch(self.dataset, self.collate_fn, n, self.cfg.seed)
        if batch is None:
            return
        batch = _to_device(batch, self.ctx.device)
        self.model.to(self.ctx.device)

        def run() -> torch.Tensor:
            with torch.autocast(self.ctx.device.type, dtype=self._dtype or torch.bfloat16,
                                enabled=self._dtype is not None):
                return self.loss_fn(self.model, batch)["loss"]

        self.frozen = freeze_gradient_free(self.model, run)

    def _warn(self, text: str) -> None:
        if self.ctx.is_main and self.logger is not None:
            self.logger.message(text)
        else:
            prefix = f"[rank {self.ctx.rank}] " if self.ctx.distributed else ""
            print(prefix + text, file=sys.stderr, flush=True)

    # --------------------------------------------------------------------------------------- fit

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to `cfg.max_steps`. With `resume=True`, continue from `out_dir`'s latest checkpoint
        (starting from scratch when there is none)."""
        self.ctx = init_distributed(self.cfg.device)
        try:
            return self._fit(resume)
        except RuntimeError as e:
            if "find_unused_parameters" in str(e) and not self.cfg.find_unused_parameters:
                raise EvlError(f"some parameters received no gradient in a step ({e.__class__.__name__}); "
                               "set train.find_unused_parameters=true for this model") from e
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
            self.ctx.close()

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        micro = self._micro_batch()
        check_out_dir(cfg.out_dir, resume, cfg.overwrite)   # every rank: the same answer on shared storage
        self.ctx.barrier()
        if cfg.overwrite and not resume and self.ctx.is_main:
            clear_checkpoints(cfg.out_dir)
        self.ctx.barrier()
        self._setup()
        progress = Progress()
        ckpt = latest_checkpoint(cfg.out_dir) if resume else None
        if ckpt is not None:
            progress = load_training_checkpoint(self.ctx, self.wrapped, self.optimizer, ckpt,
                                                expect={"global_batch": cfg.batch_size, "seed": cfg.seed,
                                                        "dataset_size": dataset_size(self.dataset)})
            if progress.step > cfg.max_steps:
                raise ConfigError(f"--resume: the checkpoint {ckpt} is at step {progress.step}, past "
                                  f"train.max_steps={cfg.max_steps}; nothing was written. Raise train.max_steps "
                                  f"to continue training, or evaluate the checkpoint (evl eval {ckpt})")
        self.logger = MetricsLogger(cfg.out_dir, cfg.max_steps, progress.step, cfg.log_every,
                                    enabled=self.ctx.is_main)
        if resume:
            self._warn(f"resumed from {ckpt} at step {progress.step}" if ckpt
                       else f"resume: no checkpoint in {cfg.out_dir}; starting from step 0")
        self._warn(f"precision {self.precision.name} ({self.precision.reason})")
        if self.frozen:
            self._warn(f"{len(self.frozen)} parameter tensors get no gradient from this objective and stay frozen "
                       f"(e.g. {', '.join(self.frozen[:4])})")
        per_micro = micro * self.ctx.world_size   # divides the global batch, so any stored position
        start_wall = time.perf_counter()
        history: list[dict[str, Any]] = []
        last_saved = progress.step if ckpt is not None else -1
        last_path: str | None = str(ckpt) if ckpt is not None else None
        while progress.step < cfg.max_steps:
            sampler = GlobalBatchSampler(len(self.dataset), micro, self.ctx.world_size,  # type: ignore[arg-type]
                                         self.ctx.rank, cfg.grad_accum, cfg.seed, progress.epoch,
                                         progress.samples_in_epoch // per_micro)
            samples_per_epoch = sampler.steps_per_epoch * cfg.batch_size
            if progress.samples_in_epoch >= samples_per_epoch:   # resumed past the end of a shorter epoch
                progress.epoch, progress.samples_in_epoch = progress.epoch + 1, 0   # (a shard stream's new layout)
                continue
            loader = make_train_loader(self.dataset, self.collate_fn, sampler, cfg.num_workers,
                                       pin_memory=self.ctx.device.type == "cuda")
            batches = iter(loader)
            epoch = progress.epoch
            while progress.epoch == epoch and progress.step < cfg.max_steps:
                t_step = time.perf_counter()
                micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
                record = self._train_step(micro_batches, progress)
                progress.step += 1
                progress.samples_in_epoch += cfg.batch_size
                if progress.samples_in_epoch >= samples_per_epoch:
                    progress.epoch, progress.samples_in_epoch = progress.epoch + 1, 0
                dt = time.perf_counter() - t_step
                progress.elapsed_s += dt
                record.update(step=progress.step, clips_per_s=round(self._last_samples / max(dt, 1e-9), 3),
                              elapsed_s=round(progress.elapsed_s, 4),
                              skipped_samples=progress.skipped_samples, nonfinite_steps=progress.nonfinite_steps)
                history.append(record)
                self.logger.log(record)
                if cfg.ckpt_every and progress.step % cfg.ckpt_every == 0:
                    last_path, last_saved = self._save(progress), progress.step
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
            del batches, loader  # shuts DataLoader workers down before the next epoch's start
        if progress.updates == 0:
            self._refuse_untrained(progress)
        if last_saved != progress.step:
            last_path = self._save(progress)
        final = {k: v for k, v in history[-1].items() if k in self._loss_keys} if history else {}
        self._warn_skip_rate(progress, final=True)
        return TrainResult(steps=progress.step, final_losses=final, history=history,
                           skipped_samples=progress.skipped_samples, nonfinite_steps=progress.nonfinite_steps,
                           wall_time_s=time.perf_counter() - start_wall, checkpoint_dir=last_path)

    def _save(self, progress: Progress) -> str:
        meta = {"global_batch": self.cfg.batch_size, "seed": self.cfg.seed,
                "dataset_size": dataset_size(self.dataset),
                "train_config": to_dict(self.cfg), "precision": self.precision.name,
                "precision_reason": self.precision.reason}
        def stage(staged: Path) -> None:
            for cb in self.callbacks:
                cb.on_checkpoint_staged(self, staged)

        path = save_training_checkpoint(self.ctx, self.wrapped, self.optimizer, progress, meta,
                                        self.model_config, self.cfg.out_dir, self.cfg.keep_last, stage)
        for cb in self.callbacks:
            cb.on_checkpoint(self, str(path))
        return str(path)

    # -------------------------------------------------------------------------------------- step

    _loss_keys: tuple[str, ...] = ()

    _last_samples: int = 0

    def _valid_micro_batches(self, micro_batches: list[CollatedBatch], progress: Progress) -> list[Any]:
        """Batches every rank can use, and the global count of dropped bad samples.

        A micro-step is skipped on all ranks if any rank's batch was entirely bad: one rank skipping a
        forward/backward alone would leave the others waiting in the gradient all-reduce forever.
        """
        flags = [float(b.batch is not None) for b in micro_batches] + [float(sum(b.skipped for b in micro_batches))]
        reduced = self.ctx.all_reduce_sum(torch.tensor(flags, dtype=torch.float64, device=self.ctx.device)).tolist()
        skipped = int(reduced[-1])
        if skipped:
            progress.skipped_samples += skipped
            self._warn(f"step {progress.step + 1}: skipped {skipped} undecodable sample(s) "
                       f"({progress.skipped_samples} so far)")
        world = self.ctx.world_size
        self._last_samples = self.cfg.batch_size - skipped
        return [b.batch for b, ok in zip(micro_batches, reduced[:-1], strict=False) if ok == world]

    def _forward_backward(self, batches: list[Any], fraction: float) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Accumulate gradients over micro-batches; returns mean scalar losses and bad-batch videos.
        `fraction` (steps done / max_steps) reaches the loss as `batch["train_progress"]` (schedules)."""
        sums: dict[str, torch.Tensor] = {}
        bad_names: list[str] = []
        for j, batch in enumerate(batches):
            batch = _to_device(batch, self.ctx.device)
            if isinstance(batch, dict):
                batch["train_progress"] = fraction
            with no_sync(self.wrapped, skip_sync=j < len(batches) - 1):
                with torch.autocast(self.ctx.device.type, dtype=self._dtype or torch.bfloat16,
                                    enabled=self._dtype is not None):
                    out = self.loss_fn(self.wrapped, batch)
                if not isinstance(out, dict) or "loss" not in out:
                    got = sorted(out) if isinstance(out, dict) else type(out).__name__
                    raise EvlError(f"loss_fn must return a dict with a 'loss' entry; got {got}")
                (out["loss"].float() / len(batches)).backward()
            for k, v in _scalars(out).items():
                sums[k] = sums.get(k, torch.zeros((), device=v.device)) + v
            if not torch.isfinite(out["loss"].detach()).all():
                bad_names += _video_names(batch) or ["<batch without video_names>"]
        return {k: v / len(batches) for k, v in sums.items()}, bad_names

    def _global_mean(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(losses)
        vec = torch.stack([losses[k].to(self.ctx.device, torch.float64) for k in keys])
        vec = self.ctx.all_reduce_sum(vec) / self.ctx.world_size
        return dict(zip(keys, vec.tolist(), strict=True))

    def _grad_norm(self) -> float:
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _train_step(self, micro_batches: list[CollatedBatch], progress: Progress) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the step's log record."""
        cfg, opt = self.cfg, self.optimizer
        assert opt is not None
        factor = lr_factor(progress.step, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        record: dict[str, Any] = {"step": progress.step + 1}
        batches = self._valid_micro_batches(micro_batches, progress)
        if not batches:
            progress.consecutive_bad += 1
            self._warn(f"step {progress.step + 1}: every sample of the batch was bad; step skipped")
            if progress.consecutive_bad >= cfg.max_bad_steps:
                raise UnreadableDataError(
                    f"{progress.consecutive_bad} steps in a row had no video that decodes "
                    f"({progress.skipped_samples} samples skipped so far); stopping before an untrained model "
                    "is saved. The warnings above name the videos: check the videos folder (data.videos) "
                    "and run `evl data check` on the annotation file.")
            return {**record, "lr": cfg.lr * factor, "skipped_batch": True}
        progress.consecutive_bad = 0
        self._warn_skip_rate(progress)
        local, bad_names = self._forward_backward(batches, progress.step / max(cfg.max_steps, 1))
        losses = self._global_mean(local)
        self._loss_keys = tuple(losses)
        grad_norm = self._grad_norm() if math.isfinite(losses["loss"]) else math.nan
        if bad_names:
            self._warn(f"step {progress.step + 1}: non-finite loss on videos {bad_names[:16]}")
        if not (math.isfinite(losses["loss"]) and math.isfinite(grad_norm)):
            self._skip_nonfinite(progress, losses["loss"], grad_norm)
        else:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor * g.get("lr_mult", 1.0)
            opt.step()
            progress.updates += 1
            progress.consecutive_nonfinite = 0
        opt.zero_grad(set_to_none=True)
        record.update(losses, lr=cfg.lr * factor, grad_norm=grad_norm)
        return record

    def _warn_skip_rate(self, progress: Progress, final: bool = False) -> None:
        """Once per run (and again at its end), a loud warning when many samples could not be read."""
        seen = max(progress.step * self.cfg.batch_size, 1)
        rate = progress.skipped_samples / seen
        if rate <= SKIP_WARN_RATE or (self._skip_warned and not final) or progress.step < 2:
            return
        self._skip_warned = True
        self._warn(f"WARNING: {progress.skipped_samples} of {seen} samples ({rate:.0%}) could not be decoded "
                   f"{'in this run' if final else 'so far'}; the model trains on what is left. "
                   "Run `evl data check` on the annotation file to list them.")

    _skip_warned = False

    def _refuse_untrained(self, progress: Progress) -> None:
        """A run whose every step was skipped (each fewer in a row than the stop limits) changed no weight:
        ending it as a success would save the initial model as if it were trained."""
        error = NonFiniteLossError if progress.nonfinite_steps else UnreadableDataError
        raise error(f"none of the {progress.step} steps updated the weights ({progress.nonfinite_steps} had a "
                    "non-finite loss or gradient, the others no decodable sample); stopping without saving an "
                    "untrained model. Check the objectives' weights and train.lr, use precision=fp32, or check "
                    "the data (the warnings above name the videos).")

    def _skip_nonfinite(self, progress: Progress, loss: float, grad_norm: float) -> None:
        progress.nonfinite_steps += 1
        progress.consecutive_nonfinite += 1
        self._warn(f"step {progress.step + 1}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                   f"({progress.consecutive_nonfinite} in a row, limit {self.cfg.max_nonfinite})")
        if progress.consecutive_nonfinite >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{progress.consecutive_nonfinite} non-finite steps in a row (last at step {progress.step + 1}, "
                f"loss {loss}); stopping. Lower train.lr, raise train.warmup_steps, use precision=fp32, "
                "or check the data (the warnings above name the videos)."
            )
