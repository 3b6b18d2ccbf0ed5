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

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from evl.data.seeding import derive_seed, seeded_rng
from evl.data.shard_stream import ShardStream
from evl.errors import ConfigError

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
    from the global torch RNG, which would shift the dropout stream of the model. A streamed data set
    (`evl.data.shard_stream.ShardStream`) gets its per-worker streams instead of the index sampler.
    """
    seed, epoch = sampler.seed, sampler.epoch
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, sampler.start_micro, sampler.rank))
    if isinstance(dataset, ShardStream):
        layout = (sampler.world_size, sampler.rank, max(1, num_workers), sampler.micro_batch)
        if layout != (dataset.world_size, dataset.rank, dataset.workers, dataset.micro_batch):
            raise ConfigError(f"the shard stream was laid out for (world, rank, workers, micro-batch) = "
                              f"{(dataset.world_size, dataset.rank, dataset.workers, dataset.micro_batch)}, "
                              f"the Trainer asks for {layout}; build it with the run's settings")
        return DataLoader(_WorkerStream(dataset, collate_fn, seed, epoch, sampler.start_micro), batch_size=None,
                          num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is, generator=generator)
    return DataLoader(
        _IndexSeededDataset(dataset, seed, epoch),
        batch_sampler=sampler,
        collate_fn=_SeededCollate(collate_fn, seed, epoch),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )


def dataset_size(dataset: Dataset) -> int:
    """The records a run trains on, as its checkpoints record them (a resume with another data set is
    refused): a shard stream's samples in all its shards, whatever the run's layout makes of an epoch."""
    return dataset.num_records if isinstance(dataset, ShardStream) else len(dataset)  # type: ignore[arg-type]


def _as_is(batch: Any) -> Any:
    return batch


class _WorkerStream(IterableDataset):
    """One loader worker's micro-batches of one epoch of a shard stream, collated as map-style training
    collates: rank micro-batch m comes from stream m mod W, so on resume at m₀ stream w skips its first
    ⌈(m₀ − w) / W⌉ batches by replaying references only (see `evl.data.shard_stream`)."""

    def __init__(self, data: ShardStream, collate_fn: Callable[[list[Any]], Any] | None, seed: int, epoch: int,
                 start_micro: int):
        self.data, self.seed, self.epoch, self.start_micro = data, seed, epoch, start_micro
        self.collate = _SeededCollate(collate_fn, seed, epoch)

    def __iter__(self) -> Iterator[CollatedBatch]:
        info = get_worker_info()
        data = self.data
        # DataLoader asks its workers in turn from worker 0; rank micro-batch m belongs to stream m mod W, so
        # after `start_micro` batches loader worker i serves stream (i + start_micro) mod W
        w = ((info.id if info is not None else 0) + self.start_micro) % data.workers
        refs = data.stream(data.rank * data.workers + w, self.seed, self.epoch)
        done = max(0, math.ceil((self.start_micro - w) / data.workers))
        try:
            for b in range(data.per_worker_batches):
                batch = [next(refs) for _ in range(data.micro_batch)]
                if b >= done:
                    yield self._collate(batch)
        finally:
            data.release()

    def _collate(self, batch: list[tuple[int, int]]) -> CollatedBatch:
        data, pairs = self.data, []
        for shard, j in batch:
            sid = data.sample_id(shard, j)
            with seeded_rng(derive_seed(self.seed, self.epoch, sid)):
                pairs.append((sid, data.load(shard, j)))
        good = [sample for _, sample in pairs if sample is not None]
        if good and len(good) < len(pairs):   # keep the micro-batch size: ranks gather equal batches
            pairs = [(sid, sample if sample is not None else {**good[k % len(good)], "replaced_bad": 1})
                     for k, (sid, sample) in enumerate(pairs)]
        return self.collate(pairs)


def make_probe_batch(dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None, n: int, seed: int) -> Any:
    """The first `n` samples, collated exactly as training collates (seeded, batch transforms
    included), for a probe pass (`evl.train.probe`); None when every one of them was bad."""
    indexed = _IndexSeededDataset(dataset, seed, epoch=-1)
    return _SeededCollate(collate_fn, seed, epoch=-1)([indexed[i] for i in range(n)]).batch
