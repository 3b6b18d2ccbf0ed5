"""Training from tar shards: streamed by rank and loader worker, with exact mid-epoch resume.

`data.train: "SHARDS/{000000..000123}.tar"` (or the folder `SHARDS/`, or one `.tar`) trains from shards
written by `evl shard` (or any WebDataset shards: their member offsets are then read from the tar headers).

How the samples flow, and why a resumed run sees exactly what an uninterrupted one would:

* **Shards are split by global worker** (rank r, loader worker w → g = r·W + w of R·W): once per run, the
  shards are dealt to the R·W workers so that each holds nearly the same number of samples (largest shard
  first, to the worker with the fewest). Every worker yields the same number of micro-batches per epoch
  (`per_worker_batches`, the smallest worker's count; the few samples beyond it are left out that epoch),
  so DataLoader's round-robin over workers gives rank batch i from worker i mod W, and every rank takes
  the same number of steps.
* **Each worker's stream is a pure function of (seed, epoch, g)**: its shards in an order drawn for the
  epoch, read sequentially, through a bounded shuffle buffer (`shuffle_buffer` samples; evicting a random
  slot as each new sample arrives). The buffer holds *references* (shard, member), not decoded data: its
  memory does not grow with its size, and the bytes of a sample are read (one seek into its shard, by the
  offsets in `<shard>.idx.json`) and decoded only when it leaves the buffer.
* **Resume**: the Trainer stores how many samples of the epoch were consumed; rank micro-batch m came from
  worker m mod W, so worker w skips its first ⌈(m₀ − w) / W⌉ batches. Skipping replays the reference stream
  only (no reads, no decoding), so a resumed run — same world size and worker count — sees exactly the
  samples, in the same order, of an uninterrupted run. Per-sample randomness (augmentation, masks) is
  seeded by (seed, epoch, sample id), as in map-style training.
* **Another world size or worker count** on resume (the fallback): shards are dealt anew, and the run goes on
  at the same point of the epoch (the same number of samples per rank); the rest of that epoch comes from
  the new layout's streams, so which samples it holds differs from an uninterrupted run (some may repeat,
  some be left out until the next epoch). The next epochs are exact again for the new layout.
* A member that cannot be read or decoded (a corrupt tar member, an undecodable video) is logged and
  replaced by another sample of its micro-batch (so every rank keeps its batch size), and counted in the
  run's skipped samples; a missing shard is an error before training starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evl.data.datasets import ClipSettings, TextMode, clip_key, record_text
from evl.data.records import Record
from evl.data.seeding import derive_seed
from evl.data.shard_write import INDEX_FILE, member_offsets, shard_index_path
from evl.data.transforms import VideoTransform
from evl.errors import ConfigError, VideoDecodeError

log = logging.getLogger(__name__)

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_source(source: str | Path) -> bool:
    """Whether `data.train` names shards: a `.tar` file or pattern, or a folder holding an index.json."""
    s = str(source)
    return s.endswith(".tar") or bool(_RANGE.search(s)) or (Path(s).is_dir() and (Path(s) / INDEX_FILE).is_file())


def expand_shards(source: str | Path) -> list[Path]:
    """`SHARDS/{000000..000123}.tar` (one brace range, zero-padded as written), one `.tar`, or a folder of
    shards → the shard files; a missing one is an error naming it."""
    s = str(source)
    if Path(s).is_dir():
        shards = sorted(Path(s).glob("*.tar"))
        if not shards:
            raise ConfigError(f"data.train={s}: the folder holds no .tar shards; write them with `evl shard`")
        return shards
    m = _RANGE.search(s)
    if m is None:
        shards = [Path(s)]
    else:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo:
            raise ConfigError(f"data.train={s}: the range {{{m.group(1)}..{m.group(2)}}} is empty (end < start)")
        shards = [Path(s[:m.start()] + str(i).zfill(width) + s[m.end():]) for i in range(lo, hi + 1)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise ConfigError(f"data.train={s}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]}); "
                          "check the pattern and the folder, or write the shards with `evl shard`")
    return shards


def shard_samples(shard: Path) -> list[dict[str, Any]]:
    """The samples of a shard with their members' [offset, size]: from `<shard>.idx.json`, else from the
    tar headers (shards written by another WebDataset tool)."""
    idx = shard_index_path(shard)
    if idx.is_file():
        return json.loads(idx.read_text())["samples"]
    return member_offsets(shard)


def deal_shards(counts: list[int], workers: int) -> list[list[int]]:
    """Shard indices per global worker, balancing the sample counts (largest shard first to the worker
    with the fewest samples; ties to the lowest worker): the same for every epoch."""
    if len(counts) < workers:
        raise ConfigError(f"{len(counts)} shards for {workers} loader streams (ranks × workers): every stream needs "
                          "at least one shard; write more, smaller shards (`evl shard --samples-per-shard`) or use "
                          "fewer workers")
    load = [0] * workers
    dealt: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        g = min(range(workers), key=lambda g: (load[g], g))
        dealt[g].append(i)
        load[g] += counts[i]
    return [sorted(d) for d in dealt]


def _shuffled(refs: Iterator[tuple[int, int]], size: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """A bounded shuffle: fill `size` slots, then for each new item emit a random slot and put it there."""
    buffer: list[tuple[int, int]] = []
    for ref in refs:
        if len(buffer) < size:
            buffer.append(ref)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = ref
    rng.shuffle(buffer)
    yield from buffer


class ShardStream:
    """A sharded training set for the Trainer: `len` = the samples of one epoch under this run's layout;
    `stream(g, seed, epoch)` = global worker g's references for an epoch, `load(shard, j)` = one sample.
    The Trainer's data feeding (`evl.train.data.make_train_loader`) turns them into the epoch's batches
    from any micro-batch on (see the module docstring)."""

    def __init__(self, source: str | Path, clip: ClipSettings, text: TextMode, *, world_size: int, rank: int,
                 workers: int, micro_batch: int, grad_accum: int, shuffle_buffer: int = 1000):
        if shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={shuffle_buffer}: must be >= 1 sample (1 = no shuffling)")
        self.source, self.clip, self.text = str(source), clip, text
        self.shards = expand_shards(source)
        root = Path(self.source) if Path(self.source).is_dir() else self.shards[0].parent
        self.info = json.loads((root / INDEX_FILE).read_text()) if (root / INDEX_FILE).is_file() else {}
        if self.info.get("mode") == "frames" and self.info.get("frames") != clip.num_frames:
            raise ConfigError(f"data.train={self.source}: the shards hold {self.info.get('frames')} pre-decoded frames "
                              f"per clip, the model reads {clip.num_frames}; write them again with `evl shard "
                              f"--frames {clip.num_frames}` (or train from video shards)")
        counts = {s["name"]: s["samples"] for s in self.info.get("shards", [])}
        self.samples: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()   # per-shard offsets, a few kept
        self.keep_indices = len(self.shards)   # until the counts are known (no index.json: every shard is read)
        self.counts = [counts.get(p.name) if p.name in counts else len(shard_samples(p)) for p in self.shards]
        smallest = max(1, min(self.counts))
        self.keep_indices = 2 + math.ceil(shuffle_buffer / smallest)
        self.num_records = sum(self.counts)
        self.world_size, self.rank, self.workers = world_size, rank, max(1, workers)
        self.micro_batch, self.grad_accum, self.shuffle_buffer = micro_batch, grad_accum, shuffle_buffer
        self.dealt = deal_shards(self.counts, world_size * self.workers)
        self.per_worker_batches = min(sum(self.counts[i] for i in d) for d in self.dealt) // micro_batch
        steps = self.per_worker_batches * self.workers // grad_accum
        if steps < 1:
            raise ConfigError(f"data.train={self.source}: {self.num_records} samples in {len(self.shards)} shards give "
                              f"each of the {world_size * self.workers} loader streams fewer than one micro-batch of "
                              f"{micro_batch}; use fewer workers or ranks, or a smaller batch")
        self.epoch_samples = steps * grad_accum * micro_batch * world_size
        self.transform = VideoTransform(size=clip.size, train=clip.train)
        self.first = np.cumsum([0, *self.counts])   # sample id = first[shard] + position in the shard
        self._tmp = threading.local()

    def __len__(self) -> int:
        return self.epoch_samples

    # ------------------------------------------------------------------ samples

    def _samples(self, shard: int) -> list[dict[str, Any]]:
        """A shard's member offsets; only the shards the shuffle buffer can still draw from are kept, so a
        worker's memory does not grow with the shards it has read (reloading one is a small JSON read)."""
        if shard in self.samples:
            self.samples.move_to_end(shard)
            return self.samples[shard]
        entries = self.samples[shard] = shard_samples(self.shards[shard])
        while len(self.samples) > self.keep_indices:
            self.samples.popitem(last=False)
        return entries

    def head_records(self, limit: int = 1000) -> list[Record]:
        """The records of the first `limit` samples (what a task checks before training), read from their
        `.json` members."""
        out: list[Record] = []
        for shard in range(len(self.shards)):
            for j in range(self.counts[shard]):
                if len(out) >= limit:
                    return out
                read = self._read_json(shard, j)
                if read is not None:
                    out.append(read[0])
        return out

    @property
    def records(self) -> list[Record]:
        """Every sample's record (QA builds its answer vocabulary from them), read once on first use."""
        if getattr(self, "_records", None) is None:
            self._records = self.head_records(self.num_records)
        return self._records

    def _read(self, shard: int, member: list[int]) -> bytes:
        offset, size = member
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]} is truncated (member at byte {offset} wants {size} bytes)")
        return data

    def _read_json(self, shard: int, j: int) -> tuple[Record, dict] | None:
        members = self._samples(shard)[j]["members"]
        if "json" not in members:
            return None
        meta = json.loads(self._read(shard, members["json"]))
        fields = {k: v for k, v in meta.items() if k in Record.__dataclass_fields__}
        return Record(**fields), meta

    def load(self, shard: int, j: int) -> dict[str, Any] | None:
        """Sample j of a shard, decoded and transformed (training's sample dict), or None (logged) when a
        member is missing, unreadable or undecodable."""
        entry = self._samples(shard)[j]
        where = f"{self.shards[shard].name}:{entry['key']}"
        try:
            read = self._read_json(shard, j)
            if read is None:
                raise ValueError("no .json member")
            record, meta = read
            frames, mask = self._frames(shard, entry, record, meta)
            sample: dict[str, Any] = {"frames": frames, "frame_mask": mask, "video_name": record.video,
                                      "clip_key": clip_key(record), "index": self.sample_id(shard, j)}
            sample.update(record_text(record, self.text, self.clip.train))
            sample["seed"] = random.getrandbits(62)
            return sample
        except (OSError, ValueError, KeyError, TypeError, VideoDecodeError) as e:
            log.warning("skipping shard sample %s: %s", where, getattr(e, "reason", None) or e)
            return None

    def _frames(self, shard: int, entry: dict, record: Record, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        members = entry["members"]
        if "npy" in members:   # pre-decoded: uint8 (T, C, S, S), sampled and resized when the shard was written
            import io

            frames = torch.from_numpy(np.load(io.BytesIO(self._read(shard, members["npy"])), allow_pickle=False))
            mask = torch.tensor(meta.get("frame_mask", [True] * frames.shape[0]), dtype=torch.bool)
            if frames.ndim != 4 or frames.dtype != torch.uint8 or len(mask) != frames.shape[0]:
                raise ValueError(f"pre-decoded frames of shape {tuple(frames.shape)} {frames.dtype}: expected uint8 "
                                 "(T, C, S, S) and a frame mask of T entries")
            return self.transform(frames), mask
        ext = next((e for e in members if e != "json"), None)
        if ext is None:
            raise ValueError("no video member")
        from evl.data.video import load_clip

        tmp = self._tmp_dir() / f"{entry['key']}.{ext}"   # the decoder reads files: one per sample, removed after
        tmp.write_bytes(self._read(shard, members[ext]))
        try:
            clip = load_clip(tmp, self.clip.num_frames, "random" if self.clip.train else "uniform",
                             start=record.start, end=record.end, backend=self.clip.backend)
        finally:
            tmp.unlink(missing_ok=True)
        return self.transform(clip.frames), clip.frame_mask

    def _tmp_dir(self) -> Path:
        if getattr(self._tmp, "dir", None) is None:
            self._tmp.dir = Path(tempfile.mkdtemp(prefix=f"evl-shard-{os.getpid()}-"))
        return self._tmp.dir

    def release(self) -> None:
        """Remove this process's folder for the video being decoded (a loader worker calls it at its end)."""
        folder = getattr(self._tmp, "dir", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            self._tmp.dir = None

    def __getstate__(self) -> dict:   # loader workers started with "spawn" get a copy without thread state
        return {k: v for k, v in self.__dict__.items() if k != "_tmp"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tmp = threading.local()

    def sample_id(self, shard: int, j: int) -> int:
        return int(self.first[shard] + j)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """Sample `index` in shard order (the Trainer's probe pass reads the first two)."""
        shard = int(np.searchsorted(self.first, index, side="right") - 1)
        try:
            return self.load(shard, index - int(self.first[shard]))
        finally:
            self.release()

    # ------------------------------------------------------------------ streams

    def stream(self, g: int, seed: int, epoch: int) -> Iterator[tuple[int, int]]:
        """Global worker g's (shard, position) references for an epoch, shuffled (see the module docstring)."""
        rng = random.Random(derive_seed(seed, epoch, g, 0x5A4D))
        shards = list(self.dealt[g])
        rng.shuffle(shards)
        refs = ((s, j) for s in shards for j in range(self.counts[s]))
        return _shuffled(refs, self.shuffle_buffer, rng)
