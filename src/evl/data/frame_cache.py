"""Decoded frames kept in memory between epochs: `data.frame_cache_mb` (off at 0).

A training run over a small set revisits every clip many times (the quickstart: ~11 reads per clip),
and decoding is a third of a tiny model's step on a 2-core CPU. With a budget set, the PyAV backend
keeps each decoded RGB frame (uint8, the video's own size, before any resize or crop) and the next read
of that frame — any clip, any epoch, any stage of the same process — skips the decoder; a clip whose
frames are all cached opens no file. Random frame sampling and random crops stay random: what is cached
is the source frame, not the sample.

Keys are (absolute path, size, mtime, frame index), so a rewritten file is decoded afresh. Least recently
used frames are dropped when the budget is full (a frame larger than the whole budget is not kept). The
cache belongs to the process that decodes: with `train.num_workers: 0` (the recipes' default) one cache
serves every epoch and every training stage of the process; a DataLoader worker keeps its own, which
lives as long as the worker (the Trainer starts its workers afresh each epoch, so with workers the cache
saves little). A corrupt file raises before anything is stored.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = ["FrameCache", "frame_cache"]

FileKey = tuple[str, int, int]


def file_key(path: str | Path) -> FileKey:
    st = Path(path).stat()
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


class FrameCache:
    """Byte-bounded LRU of decoded frames keyed by (file key, frame index)."""

    def __init__(self, capacity_bytes: int = 0):
        if capacity_bytes < 0:
            raise ValueError(f"frame cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._frames: OrderedDict[tuple[FileKey, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._frames)

    def __reduce__(self):   # a spawned worker gets its own process-wide cache, not a pickled copy
        return (frame_cache, (self.capacity / 2**20,))

    def get(self, key: FileKey, indices: list[int]) -> dict[int, np.ndarray]:
        """The cached frames among `indices` (each a read-only array), counted as hits/misses."""
        found = {}
        for i in indices:
            arr = self._frames.get((key, i))
            if arr is not None:
                self._frames.move_to_end((key, i))
                found[i] = arr
        self.hits += len(found)
        self.misses += len(indices) - len(found)
        return found

    def put(self, key: FileKey, frames: dict[int, np.ndarray]) -> None:
        for i, arr in frames.items():
            if arr.nbytes > self.capacity or (key, i) in self._frames:
                continue
            arr.flags.writeable = False   # shared by later reads: nobody may change it in place
            self._frames[(key, i)] = arr
            self.bytes += arr.nbytes
        while self.bytes > self.capacity:
            _, old = self._frames.popitem(last=False)
            self.bytes -= old.nbytes

    def clear(self) -> None:
        self._frames.clear()
        self.bytes = self.hits = self.misses = 0


_CACHE = FrameCache()


def frame_cache(mb: float) -> FrameCache:
    """This process's frame cache, its budget raised to at least `mb` MiB (a smaller request keeps the
    larger budget another dataset of the same process asked for)."""
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0:
        raise ValueError(f"frame cache size must be a number of MiB >= 0, got {mb!r}")
    _CACHE.capacity = max(_CACHE.capacity, int(mb * 2**20))
    return _CACHE
