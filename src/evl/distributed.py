"""Small helpers for running under ``torchrun`` (DDP), and a no-op in a single process.

Contrastive losses need the embeddings of the *whole* global batch, not only this rank's: with 8 GPUs of
batch 64 the negatives should be 511, not 63. :func:`all_gather_with_grad` gathers them while keeping
the gradient path back to each rank's own embeddings, so that training on W ranks of batch B gives the
same gradients as one process on batch W·B (see its docstring for the scaling argument).

Everything here reads ``torch.distributed``'s state lazily; nothing initialises a process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "all_gather_with_grad",
    "get_rank",
    "get_world_size",
    "is_dist_initialized",
    "is_main_process",
]


def is_dist_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up (i.e. under torchrun after init)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """Whether this process should write logs, checkpoints and reports (rank 0)."""
    return get_rank() == 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate a tensor from all ranks along dim 0; backward sums grads and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.local_rows = tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        # Every rank's loss depends on this rank's rows; summing over ranks collects all those paths.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def _check_same_rows(tensor: torch.Tensor) -> None:
    """``dist.all_gather`` needs equal shapes on every rank; fail with a message instead of hanging."""
    rows = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    gathered = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    sizes = [int(g.item()) for g in gathered]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"all_gather_with_grad needs the same batch size on every rank, got per-rank sizes {sizes}; "
            "use drop_last=True in the DataLoader/DistributedSampler"
        )


def all_gather_with_grad(tensor: torch.Tensor, check_sizes: bool = False) -> torch.Tensor:
    """Gather ``tensor`` (B, ...) from all W ranks into (W·B, ...), rank order, with gradient.

    In a single process (or when ``torch.distributed`` is not initialised) the input is returned as is.

    Why the backward is "all-reduce (sum), then take my slice": rank r computes a loss L_r that is a
    mean over its own B query rows, but L_r reads the gathered features of *every* rank. The global
    single-process loss on the W·B batch is L = (1/W) Σ_r L_r (means over equal-sized blocks). The
    gradient of Σ_s L_s with respect to rank r's features is the sum over s of the slice r of the
    gradient that rank s sees on its gathered tensor — exactly what the all-reduce-then-slice returns.
    Each rank therefore back-propagates d(Σ_s L_s)/dθ_r through its own encoder, and DDP then
    *averages* parameter gradients over ranks, giving (1/W) d(Σ_s L_s)/dθ = dL/dθ: the same gradient
    as one process on the global batch. (A plain ``dist.all_gather`` has no gradient; gathering without
    the all-reduce would lose the other ranks' contributions and under-count by a factor W.)

    Every rank must pass the same shape; ``check_sizes=True`` verifies the batch size first (one extra
    small collective) and raises a readable error instead of a hang or a cryptic backend error.
    """
    if not is_dist_initialized() or dist.get_world_size() == 1:
        return tensor
    if check_sizes:
        _check_same_rows(tensor)
    return _AllGatherWithGrad.apply(tensor)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (rank order); ``[obj]`` in a single process.

    Used for the metadata that builds a global positive mask (e.g. EgoNCE's verb/noun lists), which
    must describe the same global batch as the gathered embeddings.
    """
    if not is_dist_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
