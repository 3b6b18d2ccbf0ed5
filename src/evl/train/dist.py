"""Process-group setup and model wrapping for the Trainer (single process, DDP, FSDP2).

Under `torchrun` (WORLD_SIZE > 1) the process group is initialised from the environment variables
torchrun sets: NCCL when a GPU is used, gloo on CPU. In a single process nothing is initialised and the
model is not wrapped, so the same code path runs on a laptop and on a cluster.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from evl.errors import ConfigError

__all__ = ["DistContext", "init_distributed", "unwrap_model", "wrap_model"]


@dataclass
class DistContext:
    """Where this process sits: rank, world size, its device, and whether we created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place and returned); identity in a single process."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def pick_device(device: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` → this rank's device; anything else, or a GPU this machine does
    not have, is a ConfigError naming `key` (the recipe key or CLI option the value came from)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={device!r}: evl runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={device!r} but this machine has no usable CUDA GPU "
                              f"(torch {torch.__version__}); use {key}=auto or cpu")
        dev = torch.device(f"cuda:{local_rank}") if dev.index is None else dev
        if dev.index >= count:
            raise ConfigError(f"{key}={device!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group (if WORLD_SIZE > 1) and pick this rank's device.

    An already-initialised group (created by the caller) is reused and left open at the end.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        owns = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    return DistContext(0, 1, 0, dev, False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (`.module`) and/or `torch.compile` (`._orig_mod`) wrappers.

    Save and load through this, so checkpoint keys never carry a "module." prefix. (FSDP2 shards the
    module in place and adds no wrapper.)
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _broadcast_from_rank0(model: nn.Module) -> None:
    """FSDP2 does not sync initial weights (DDP does); make every rank start from rank 0's."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def _shard_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard every element of every ModuleList (the transformer blocks), then the root.

    Sharding per block keeps peak memory at one block's full parameters during forward/backward;
    the root call takes care of what is left (embeddings, heads, norms).
    """
    from torch.distributed.fsdp import fully_shard

    _broadcast_from_rank0(model)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str, find_unused_parameters: bool) -> nn.Module:
    """Move to the device and wrap for data parallelism ("ddp" or "fsdp"); unwrapped in one process."""
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        return _shard_fsdp(model)
    raise ConfigError(f"train.strategy={strategy!r} is not one of ['ddp', 'fsdp']")


def no_sync(model: nn.Module, skip_sync: bool) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce for accumulation micro-steps that are not the last one."""
    if not skip_sync:
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _FsdpNoSync(model)
    return nullcontext()


class _FsdpNoSync:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync") and not isinstance(model, nn.parallel.DistributedDataParallel)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) as full, unsharded CPU tensors. Collective under FSDP2.

    Under FSDP2 only rank 0 receives the tensors (the others get empty dicts); under DDP or in a
    single process the state is already replicated and is read directly.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return unwrap_model(model).state_dict(), optimizer.state_dict()

