"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `out_dir/checkpoints/step_00000005/` holding

* `model.safetensors` + `config.json`  — the model's weights and config (loadable on their own: what
  `evl eval`, `--init` and `from_pretrained` read);
* `aux.safetensors` — the auxiliary state of the training objective (loss terms' teachers, tokenizers,
  decoders, selectors), present only when there is any; `--resume` needs it, evaluation never does;
* `optimizer.safetensors` + `optimizer.json` — optimizer tensors, and its structure/hyper-parameters;
* `trainer_state.json` — step, data position (epoch, samples consumed in the epoch), counters;
* `rng_rank{r}.safetensors` + `rng_rank{r}.json` — each rank's torch CPU/CUDA, numpy and python RNG.

It is written into `.tmp-step_...` and renamed into place when complete; `latest.json` is written
last. A kill at any instant therefore leaves either the previous checkpoint or the new one, and
`latest.json` never points at a partial directory. Assumes a file system every rank can see.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evl.checkpoint import (
    AUX_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_PREFIX,
    atomic_write_json,
    atomic_write_safetensors,
    commit_dir,
    load_tensor_tree,
    load_tensors,
    read_json,
    save_tensor_tree,
)
from evl.errors import CheckpointError, ConfigError
from evl.train.dist import DistContext, full_state_dicts, is_fsdp, unwrap_model

log = logging.getLogger(__name__)

__all__ = ["Progress", "check_out_dir", "clear_checkpoints", "latest_checkpoint", "load_training_checkpoint",
           "save_training_checkpoint"]

LATEST = "latest.json"
STATE_FILE = "trainer_state.json"
FINAL_DIR = "final"            # what a finished run leaves beside its checkpoints (recipes, vq, vlap)
SUMMARY_FILE = "summary.json"




@dataclass
class Progress:
    """Where training is. `samples_in_epoch` counts this epoch's consumed samples (global batch ×
    steps): unlike a count of micro-batches it means the same thing whatever the number of ranks and
    `train.grad_accum`, so a run may resume with a different accumulation."""

    step: int = 0
    updates: int = 0   # steps whose optimizer update ran (not skipped as non-finite or without data)
    epoch: int = 0
    samples_in_epoch: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    consecutive_bad: int = 0
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


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state without the "model." prefix, auxiliary state). A module without a "model."
    sub-module (the Trainer trains any module) keeps everything in the model part."""
    if not any(k.startswith(MODEL_PREFIX) for k in state):
        return state, {}
    model = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    return model, {k: v for k, v in state.items() if not k.startswith(MODEL_PREFIX)}


def _joined_state(module: nn.Module, ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model + auxiliary tensors under the names of `module`'s state dict."""
    model = load_tensors(ckpt / MODEL_FILE)
    aux = load_tensors(ckpt / AUX_FILE) if (ckpt / AUX_FILE).is_file() else {}
    own = module.state_dict().keys()
    wrapped = any(k.startswith(MODEL_PREFIX) for k in own)
    if wrapped and not any(k.startswith(MODEL_PREFIX) for k in model):
        model = {MODEL_PREFIX + k: v for k, v in model.items()}
    return {**model, **aux}


def _step_of(path: Path) -> int:
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def _prune(root: Path, keep_last: int, current: Path) -> None:
    """Keep the newest `keep_last` step_* directories by step number (0 keeps all); never the one
    just written (`current`, which latest.json points to)."""
    if keep_last <= 0:
        return
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
    for old in steps[:-keep_last]:
        if old.resolve() != current.resolve():
            shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Before any work: `out_dir` must be writable, and a fresh run (no `resume`) must not mix with, or
    replace, another run's output: its checkpoints, or its `final/` and `summary.json` when the
    checkpoints were deleted. Raises ConfigError naming the folder, what is there and the ways out."""
    out = Path(out_dir)
    probe = out / f".evl-write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.out_dir={out} cannot be written ({e.strerror or e}); nothing was trained. "
                          "Choose a folder you can write to (train.out_dir=...).") from None
    if overwrite:
        return
    root = checkpoint_root(out)
    old = sorted(p.name for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    if old or (root / LATEST).is_file():
        if resume:
            return
        raise ConfigError(f"train.out_dir={out} holds another run's checkpoints ({', '.join(old[-2:]) or LATEST}); "
                          "a new run there would mix with them. Continue that run with --resume, choose a new "
                          "train.out_dir, or pass train.overwrite=true to delete them.")
    earlier = [name for name in (FINAL_DIR, SUMMARY_FILE) if (out / name).exists()]
    if earlier:
        raise ConfigError(f"train.out_dir={out} holds an earlier run's output ({', '.join(earlier)}) and no checkpoint"
                          f"{' to resume from' if resume else ''}; a new run would replace it. Choose a new "
                          "train.out_dir, or pass train.overwrite=true to replace it.")


def clear_checkpoints(out_dir: str | Path) -> None:
    """Delete a previous run's checkpoints (train.overwrite=true)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        log.warning("train.overwrite=true: deleting the previous run's checkpoints in %s", root)
        shutil.rmtree(root)


def save_training_checkpoint(ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                             progress: Progress, meta: dict[str, Any], model_config: dict[str, Any],
                             out_dir: str | Path, keep_last: int = 0,
                             stage: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint for `progress.step` (collective: every rank must call it). `stage(tmp)` runs
    on the main rank after evl's files are written and before the folder is committed and latest.json
    points at it: what it adds is part of the checkpoint from the first moment it can be resumed."""
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
        model_part, aux_part = split_state(model_state)
        atomic_write_safetensors(tmp / MODEL_FILE, model_part)
        if aux_part:
            atomic_write_safetensors(tmp / AUX_FILE, aux_part)
        atomic_write_json(tmp / CONFIG_FILE, model_config)
        save_tensor_tree(tmp, "optimizer", optim_state)
        atomic_write_json(tmp / STATE_FILE, {**asdict(progress), **meta, "world_size": ctx.world_size})
        if stage is not None:
            stage(tmp)
        commit_dir(tmp, final)
        atomic_write_json(root / LATEST, {"step": progress.step, "dir": name})
        _prune(root, keep_last, final)
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
        set_model_state_dict(model, _joined_state(model, ckpt), options=opts)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        return
    module = unwrap_model(model)
    state = _joined_state(module, ckpt)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not fit this run's model and loss terms: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}. Resume with the recipe (model and objectives) "
                              "that wrote it, or start a new train.out_dir.")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise CheckpointError(f"{ckpt}: tensors of another shape than this run's model: {bad[:8]}")
    module.load_state_dict(state, strict=True)
    try:
        optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in {ckpt} does not fit this model's parameter groups: {e}. "
                              "Was lr_mults or the model changed since the checkpoint?") from e


def _check_state_types(state: Any, file: Path) -> None:
    """Every progress field a number of the right kind, so a hand-edited file fails here, by name."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for name, spec in Progress.__dataclass_fields__.items():
        if name not in state:
            continue
        real = spec.type in (float, "float")
        value, kind = state[name], (int, float) if real else int
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise CheckpointError(f"{file}: {name} must be a non-negative {'number' if real else 'integer'}, "
                                  f"got {value!r}; restore the file or resume from another step_* folder")


def load_training_checkpoint(ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                             ckpt: Path, expect: dict[str, Any]) -> Progress:
    """Restore model, optimizer, RNG and data position from `ckpt`.

    `expect` holds settings that must match for the data position to mean the same thing (the global
    batch size); a mismatch raises CheckpointError instead of silently replaying or skipping data.
    `train.grad_accum` and the number of ranks may change: the position is stored in samples.
    """
    state = read_json(ckpt / STATE_FILE)
    _check_state_types(state, ckpt / STATE_FILE)
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
    progress = Progress(**{k: v for k, v in state.items() if k in fields})
    if "updates" not in state:   # written before updates were counted: every step but the non-finite ones
        progress.updates = max(progress.step - progress.nonfinite_steps, 0)
    if "micro_in_epoch" in state and "samples_in_epoch" not in state:   # written before samples were counted
        accum = int(state.get("train_config", {}).get("grad_accum", 1))
        progress.samples_in_epoch = int(state["micro_in_epoch"]) * int(state.get("global_batch", 0)) // max(accum, 1)
    return progress
