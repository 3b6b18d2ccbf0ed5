"""Data feeding for the Trainer: global-batch sampling across ranks, bad-sample skipping, seeded RNG.

Three guarantees, each needed for an exact resume and for "2 ranks == 1 rank":

* the samples of global step s are the same whatever the number of ranks or accumulation steps:
  slice s of a permutation that depends only on (seed + epoch);
* a resumed run starts at the same place in the permutation (epoch, micro-batch index), without
  decoding the skipped samples;
* randomness *inside* data loading (augmentation, MLM masking in a collate function) is seeded from
  (seed, epoch, sample index), not from whatever state a worker process happens to have — so it does
  not depend on `num_workers`, on which worker got the sample, or on where a run was resumed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = [
    "CollatedBatch",
    "GlobalBatchSampler",
    "derive_seed",
    "make_probe_batch",
    "make_train_loader",
    "skip_none_collate",
]


class CollatedBatch(NamedTuple):
    """A collated batch (None when every sample was bad) and how many bad samples were dropped.

    A NamedTuple so that DataLoader's pin_memory and worker transport carry it through unchanged.
    """

    batch: Any
    skipped: int


class _SkipNoneCollate:
    """Callable behind :func:`skip_none_collate` (a class so spawn-started workers can pickle it)."""

    skips_none = True

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None):
        self.inner = collate_fn or default_collate

    def __call__(self, samples: list[Any]) -> CollatedBatch:
        kept = [s for s in samples if s is not None]
        # a dataset may replace a bad sample by a good one (keeping batch sizes equal across ranks)
        # and mark it with "replaced_bad": those count as skipped too
        replaced = sum(int(s.get("replaced_bad", 0)) for s in kept if isinstance(s, dict))
        return CollatedBatch(self.inner(kept) if kept else None, len(samples) - len(kept) + replaced)


def skip_none_collate(collate_fn: Callable[[list[Any]], Any] | None = None
                      ) -> Callable[[list[Any]], CollatedBatch]:
    """Wrap `collate_fn` so that samples the dataset returned as None (undecodable videos) are dropped.

    Returns a function giving :class:`CollatedBatch` (batch, number dropped). A batch in which every
    sample was None becomes `CollatedBatch(None, n)`; the Trainer skips it. The count travels with the
    batch (rather than in a counter) because collate runs inside DataLoader worker processes, whose
    memory the main process cannot see. `collate_fn=None` means torch's default collate.
    """
    return _SkipNoneCollate(collate_fn)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, sample index).

    SeedSequence hashes its input, so neighbouring indices give unrelated streams (a plain
    `seed + index` would make sample i of epoch 1 share the stream of sample i+1 of epoch 0).
    """
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), python `random` and numpy for the block, then restore their previous states.

    Restoring matters when data loads in the main process (num_workers=0): the model's dropout stream
    must not be disturbed by data loading, or losses would depend on `num_workers`.
    """
    torch_state = torch.random.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of index lists for one epoch.

    Global step s of the epoch uses `perm[s*B:(s+1)*B]` where B is the global batch and `perm` a
    permutation seeded by (seed + epoch). That block is cut into `grad_accum` micro-steps of
    `world * micro` samples, and each of those into `world` contiguous pieces; rank r takes piece r.
    The union over ranks and micro-steps is the same set whatever `world` and `grad_accum` are, which
    is why a 2-rank run trains on exactly the global batches of a 1-rank run. An incomplete last global
    batch is dropped so every step averages over exactly B samples. `start_micro` skips the first
    micro-batches (resume) without touching the dataset.
    """

    def __init__(self, num_samples: int, micro_batch: int, world_size: int, rank: int, grad_accum: int,
                 seed: int, epoch: int, start_micro: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.epoch = epoch
        self.start_micro = start_micro
        self.shuffle = shuffle

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.grad_accum - self.start_micro)

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self._permutation()
        chunk = self.world_size * self.micro_batch
        for m in range(self.start_micro, self.steps_per_epoch * self.grad_accum):
            start = m * chunk + self.rank * self.micro_batch
            yield perm[start : start + self.micro_batch]


class _IndexSeededDataset(Dataset):
    """Returns (index, sample) with the sample produced under RNG seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        with seeded_rng(derive_seed(self.seed, self.epoch, index)):
            return index, self.dataset[index]


class _SeededCollate:
    """Collate (index, sample) pairs under RNG seeded by (seed, epoch, first index), skipping None samples.

    A class (not a closure) so DataLoader workers started with "spawn" can pickle it.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, seed: int, epoch: int):
        fn = collate_fn
        self.collate = fn if getattr(fn, "skips_none", False) else skip_none_collate(fn)
        self.seed = seed
        self.epoch = epoch

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> CollatedBatch:
        first = pairs[0][0] if pairs else 0
        with seeded_rng(derive_seed(self.seed, self.epoch, first, 0xC011A7E)):
            return self.collate([sample for _, sample in pairs])


def make_train_loader(dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None,
                      sampler: GlobalBatchSampler, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader for one epoch (from `sampler.start_micro` on) that yields CollatedBatch.

    The loader gets its own seeded generator: otherwise creating its iterator draws a worker base seed
    from the global torch RNG, which would shift the dropout stream of the model.
    """
    seed, epoch = sampler.seed, sampler.epoch
    return DataLoader(
        _IndexSeededDataset(dataset, seed, epoch),
        batch_sampler=sampler,
        collate_fn=_SeededCollate(collate_fn, seed, epoch),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, sampler.start_micro, sampler.rank)),
    )


def make_probe_batch(dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None, n: int, seed: int) -> Any:
    """The first `n` samples, collated exactly as training collates (seeded, batch transforms
    included), for a probe pass (`evl.train.probe`); None when every one of them was bad."""
    indexed = _IndexSeededDataset(dataset, seed, epoch=-1)
    return _SeededCollate(collate_fn, seed, epoch=-1)([indexed[i] for i in range(n)]).batch
