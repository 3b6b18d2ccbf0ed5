"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `out_dir/checkpoints/step_00000005/` holding

* `model.safetensors` + `config.json`  — the weights and the model config (loadable on their own);
* `optimizer.safetensors` + `optimizer.json` — optimizer tensors, and its structure/hyper-parameters;
* `trainer_state.json` — step, data position (epoch, micro-batch within the epoch), counters;
* `rng_rank{r}.safetensors` + `rng_rank{r}.json` — each rank's torch CPU/CUDA, numpy and python RNG.

It is written into `.tmp-step_...` and renamed into place when complete; `latest.json` is written
last. A kill at any instant therefore leaves either the previous checkpoint or the new one, and
`latest.json` never points at a partial directory. Assumes a file system every rank can see.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evl.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    atomic_write_json,
    atomic_write_safetensors,
    commit_dir,
    load_model_state,
    load_tensor_tree,
    load_tensors,
    read_json,
    save_tensor_tree,
)
from evl.errors import CheckpointError
from evl.train_dist import DistContext, full_state_dicts, is_fsdp, unwrap_model

log = logging.getLogger(__name__)

__all__ = ["Progress", "latest_checkpoint", "load_training_checkpoint", "save_training_checkpoint"]

LATEST = "latest.json"
STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """Where training is. `micro_in_epoch` counts this epoch's consumed micro-batches (per rank)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    elapsed_s: float = 0.0


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory `latest.json` points to, or None when the run has no checkpoint yet."""
    root = checkpoint_root(out_dir)
    if not (root / LATEST).is_file():
        return None
    pointer = read_json(root / LATEST)
    path = root / str(pointer.get("dir", ""))
    if not path.is_dir():
        raise CheckpointError(f"{root / LATEST} points to {path}, which does not exist; "
                              "delete latest.json to start over or point it at an existing step_* directory")
    return path


# ------------------------------------------------------------------------------------------- RNG


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    version, py_state, py_gauss = random.getstate()
    info = {"python": {"version": version, "state": list(py_state), "gauss_next": py_gauss},
            "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "cached_gaussian": float(np_gauss)}}
    return tensors, info


def _set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.random.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = info["numpy"]
    np.random.set_state((n["name"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = info["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------- save


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step_* directories (0 keeps all)."""
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                             progress: Progress, meta: dict[str, Any], model_config: dict[str, Any],
                             out_dir: str | Path, keep_last: int = 0) -> Path:
    """Write the checkpoint for `progress.step` (collective: every rank must call it)."""
    root = checkpoint_root(out_dir)
    name = f"step_{progress.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    model_state, optim_state = full_state_dicts(model, optimizer)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    rng_tensors, rng_info = _rng_state()
    atomic_write_safetensors(tmp / f"rng_rank{ctx.rank}.safetensors", rng_tensors)
    atomic_write_json(tmp / f"rng_rank{ctx.rank}.json", rng_info)
    ctx.barrier()
    if ctx.is_main:
        atomic_write_safetensors(tmp / MODEL_FILE, model_state)
        atomic_write_json(tmp / CONFIG_FILE, model_config)
        save_tensor_tree(tmp, "optimizer", optim_state)
        atomic_write_json(tmp / STATE_FILE, {**asdict(progress), **meta, "world_size": ctx.world_size})
        commit_dir(tmp, final)
        atomic_write_json(root / LATEST, {"step": progress.step, "dir": name})
        _prune(root, keep_last)
    ctx.barrier()
    return final


# ------------------------------------------------------------------------------------------- load


def _load_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    optim_state = load_tensor_tree(ckpt, "optimizer")
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_tensors(ckpt / MODEL_FILE), options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        return
    load_model_state(unwrap_model(model), ckpt / MODEL_FILE, strict=True)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {ckpt} does not fit this model's parameter groups: {e}. "
                              "Was lr_mults or the model changed since the checkpoint?") from e


def load_training_checkpoint(ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                             ckpt: Path, expect: dict[str, Any]) -> Progress:
    """Restore model, optimizer, RNG and data position from `ckpt`.

    `expect` holds settings that must match for the data position to mean the same thing (the global
    batch size); a mismatch raises CheckpointError instead of silently replaying or skipping data.
    """
    state = read_json(ckpt / STATE_FILE)
    for key, value in expect.items():
        if key in state and state[key] != value:
            setting = {"global_batch": "train.batch_size", "seed": "train.seed",
                       "dataset_size": "the number of training records"}.get(key, key)
            raise CheckpointError(f"cannot resume from {ckpt}: it was written with {setting}={state[key]}, "
                                  f"this run has {setting}={value}. Use the same value, or start a new out_dir.")
    _load_model_and_optimizer(model, optimizer, ckpt)
    rng_file = ckpt / f"rng_rank{ctx.rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_tensors(rng_file), read_json(ckpt / f"rng_rank{ctx.rank}.json"))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); dropout will not replay exactly",
                    ckpt, ctx.rank)
    fields = Progress.__dataclass_fields__
    return Progress(**{k: v for k, v in state.items() if k in fields})
