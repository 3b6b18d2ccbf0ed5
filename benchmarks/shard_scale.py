"""Streaming 100k+ samples from tar shards at constant memory.

Usage: python benchmarks/shard_scale.py [--samples 100000] [--distinct 500] [--workers 2] [--json PATH]

Builds a shard set of `--samples` samples (`--distinct` SynthVL clips of 16 frames at 64², each stored
`samples / distinct` times under its own key with its own record, 1,000 samples per shard, written with the
webdataset package and indexed as `evl shard` indexes) — repetition keeps the build short and changes
nothing for the loader, which reads and decodes every sample — then streams one whole epoch through the
Trainer's own loader (`ShardStream`, `--workers` workers, micro-batches of 32, shuffle buffer 1,000, 8
frames per clip), sampling the resident memory of the process and its workers every second. Reports the
samples streamed (each once), clips/s, and the RSS over the run: after the first fifth (workers started),
at the end, and the least-squares slope over the last four fifths. Writes benchmarks/results/shard_scale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import finish_meta, run_meta  # noqa: E402
from data_loading import PeakRSS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shard_scale.json"


def build(work: Path, samples: int, distinct: int) -> Path:
    import webdataset as wds

    from evl.data.annotations import read_annotations
    from evl.data.shard_write import INDEX_FILE, write_index
    from evl.data.synthetic import write_synthvl

    shards = work / "shards"
    if (shards / INDEX_FILE).is_file():
        return shards
    data = work / "synthvl"
    if not (data / "annotations" / "pretrain.json").is_file():
        write_synthvl(data, clips=max(distinct * 10 // 7 + 1, 60), seed=0, frames=16, size=64)
    records = read_annotations(data / "annotations" / "pretrain.json")[:distinct]
    videos = {r.video: (data / "videos" / r.video).read_bytes() for r in records}
    shards.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with wds.ShardWriter(str(shards / "%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i in range(samples):
            r = records[i % len(records)]
            meta = {"video": f"copy{i // len(records)}/{r.video}", "captions": r.captions}
            sink.write({"__key__": f"{i:09d}", "json": json.dumps(meta).encode(), "mp4": videos[r.video]})
    index = write_index(shards, {"mode": "video", "frames": None, "size": None, "skipped": {}})
    print(f"wrote {samples} samples in {len(index['shards'])} shards in {time.perf_counter() - t0:.0f} s", flush=True)
    return shards


class RSSTrace(PeakRSS):
    """PeakRSS that also keeps (seconds, bytes) every `every` seconds."""

    def __init__(self, every: float = 1.0):
        super().__init__()
        self.every, self.trace = every, []

    def _run(self):
        import os

        me, t0 = os.getpid(), time.perf_counter()
        while not self._stop.is_set():
            rss = self._rss(me) + sum(self._rss(c) for c in self._children(me))
            self.peak = max(self.peak, rss)
            self.trace.append((round(time.perf_counter() - t0, 1), rss))
            self._stop.wait(self.every)


def stream_epoch(shards: Path, workers: int) -> dict:
    import torch

    from evl.data.datasets import ClipSettings
    from evl.data.shard_stream import ShardStream
    from evl.train.data import GlobalBatchSampler, make_train_loader

    def ids(samples):
        return {"index": torch.tensor([s["index"] for s in samples])}

    ds = ShardStream(shards, ClipSettings(num_frames=8, size=64, train=True), "caption", world_size=1, rank=0,
                     workers=workers, micro_batch=32, grad_accum=1)
    sampler = GlobalBatchSampler(len(ds), 32, 1, 0, 1, seed=0, epoch=0)
    seen = torch.zeros(ds.num_records, dtype=torch.int32)
    skipped = 0
    with RSSTrace() as rss:
        t0 = time.perf_counter()
        for n, b in enumerate(make_train_loader(ds, ids, sampler, workers, pin_memory=False)):
            seen[b.batch["index"]] += 1
            skipped += b.skipped
            if n % 200 == 0 and rss.trace:
                print(f"  {int(seen.sum())} samples, {time.perf_counter() - t0:.0f} s, "
                      f"RSS {rss.trace[-1][1] / 2**20:.0f} MB", flush=True)
        dt = time.perf_counter() - t0
    mb = [(t, r / 2**20) for t, r in rss.trace]
    settled = mb[len(mb) // 5:]   # after the first fifth: the workers started and their decoders warmed up
    n = len(settled)
    mt, mr = sum(t for t, _ in settled) / n, sum(r for _, r in settled) / n
    slope = sum((t - mt) * (r - mr) for t, r in settled) / max(sum((t - mt) ** 2 for t, _ in settled), 1e-9)
    k = max(1, n // 8)
    return {"samples_in_epoch": len(ds), "records": ds.num_records, "streamed": int(seen.sum()),
            "distinct_streamed": int((seen > 0).sum()), "max_times_one_sample": int(seen.max()),
            "skipped": skipped, "seconds": round(dt, 1), "clips_per_s": round(int(seen.sum()) / dt, 1),
            "rss_mb_after_warmup": round(sum(r for _, r in settled[:k]) / k, 1),
            "rss_mb_at_end": round(sum(r for _, r in settled[-k:]) / k, 1), "rss_mb_peak": round(rss.peak / 2**20, 1),
            "rss_slope_mb_per_min_after_warmup": round(slope * 60, 3), "rss_trace_mb": [(t, round(r, 1)) for t, r in mb]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--distinct", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evl-shard-scale")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    meta = run_meta(seeds=[0])
    shards = build(args.work, args.samples, args.distinct)
    result = stream_epoch(shards, args.workers)
    for key in ("samples_in_epoch", "streamed", "distinct_streamed", "max_times_one_sample", "skipped", "seconds",
                "clips_per_s", "rss_mb_after_warmup", "rss_mb_at_end", "rss_mb_peak",
                "rss_slope_mb_per_min_after_warmup"):
        print(f"{key:24s} {result[key]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "settings": vars(args) | {"work": str(args.work),
                                                                                          "json": str(args.json)},
                                     **result}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
