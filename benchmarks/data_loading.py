"""Data loading against the training step: a folder of mp4s vs video shards vs pre-decoded shards, 0/1/2 workers.

Usage: python benchmarks/data_loading.py [--clips 400] [--batches 12] [--steps 8] [--json PATH]

For each source and worker count it measures, on a SynthVL set generated here (16-frame 64² clips, 8
frames read per clip, the tiny model's input, batch 32, captions tokenized as training does):
* loader-only clips/s: pulling `--batches` micro-batches through the Trainer's own loader (after 2 warm-up
  batches, which include starting the workers), and the peak RSS of the process and its workers;
* the data share of a training step: `--steps` steps of the tiny model (VTC, `precision: auto`) fed by that
  loader, the time spent waiting for the next batch over the whole step (what the workers do not hide).
It also times the train step of `tiny` (VTC alone, and VTC + VTM + MLM) and `small` on in-memory batches,
so the loader rates can be read against them. Writes benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import finish_meta, run_meta  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_loading.json"
BATCH, FRAMES, SIZE = 32, 8, 64


class PeakRSS:
    """The largest resident set of this process plus its children (loader workers), sampled every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _children(self, pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss(me) + sum(self._rss(c) for c in self._children(me)))
            time.sleep(0.05)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def _sources(work: Path, clips: int) -> dict[str, str]:
    from evl.data.shard_write import write_shards
    from evl.data.synthetic import write_synthvl

    data = work / "synthvl"
    if not (data / "annotations" / "pretrain.json").is_file():
        write_synthvl(data, clips=clips, seed=0, frames=16, size=SIZE)
    ann = data / "annotations" / "pretrain.json"
    if not (work / "video" / "index.json").is_file():
        write_shards(ann, data / "videos", work / "video", samples_per_shard=64)
    if not (work / "frames" / "index.json").is_file():
        write_shards(ann, data / "videos", work / "frames", samples_per_shard=64, frames=FRAMES, size=SIZE)
    return {"mp4 folder": str(ann), "video shards": str(work / "video"), "pre-decoded shards": str(work / "frames")}


def _dataset(source: str, videos: Path, workers: int):
    from evl.data.datasets import ClipSettings, VideoTextDataset
    from evl.data.shard_stream import ShardStream, is_shard_source

    clip = ClipSettings(num_frames=FRAMES, size=SIZE, train=True)
    if is_shard_source(source):
        return ShardStream(source, clip, "caption", world_size=1, rank=0, workers=workers, micro_batch=BATCH,
                           grad_accum=1)
    return VideoTextDataset.from_file(source, videos, clip, "caption", replace_bad=8)


def _loader(ds, collate, workers: int, epoch: int):
    from evl.train.data import GlobalBatchSampler, make_train_loader

    sampler = GlobalBatchSampler(len(ds), BATCH, 1, 0, 1, seed=0, epoch=epoch)
    return make_train_loader(ds, collate, sampler, workers, pin_memory=False)


def loader_only(ds, collate, workers: int, batches: int) -> dict:
    with PeakRSS() as rss:
        loader = _loader(ds, collate, workers, epoch=0)
        it = iter(loader)
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        got = 0
        for _ in range(batches):
            try:
                got += len(next(it).batch["index"])
            except StopIteration:
                break
        dt = time.perf_counter() - t0
        del it, loader
    return {"clips_per_s": round(got / dt, 1), "ms_per_batch": round(1000 * dt * BATCH / max(got, 1), 1),
            "batches": got // BATCH, "peak_rss_mb": round(rss.peak / 2**20, 1)}


def _objective(name: str, objectives: dict):
    from evl.config import from_dict, load_yaml
    from evl.data.datasets import Collator
    from evl.data.text import tokenizer_for
    from evl.models.model import ModelConfig, VideoLanguageModel
    from evl.train.objective import TrainObjective

    torch.manual_seed(0)
    model = VideoLanguageModel(from_dict(ModelConfig, load_yaml(name, "models"), where=name))
    tok = tokenizer_for(model.cfg)
    objective = TrainObjective.from_spec(model, objectives, tok).train()
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    return objective, opt, Collator(tok, 32, transforms=objective.batch_transforms())


def _step(objective, opt, batch, autocast) -> None:
    with torch.autocast(**autocast):
        loss = objective(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _autocast():
    from evl.precision import resolve_precision

    p = resolve_precision("auto", "cpu")
    return p.name, dict(device_type="cpu", dtype=p.autocast_dtype or torch.bfloat16, enabled=p.autocast_dtype is not None)


def training_share(ds, workers: int, steps: int) -> dict:
    """Steps of the tiny model fed by the loader: the wait for each next batch over the whole step."""
    objective, opt, collate = _objective("tiny", {"vtc": 1.0})
    _, autocast = _autocast()
    waits, totals = [], []
    it = iter(_loader(ds, collate, workers, epoch=1))
    for i in range(steps + 2):
        t0 = time.perf_counter()
        try:
            batch = next(it).batch
        except StopIteration:
            break
        t1 = time.perf_counter()
        _step(objective, opt, batch, autocast)
        if i >= 2:   # the first two include the workers' start
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
    return {"data_wait_s": round(statistics.median(waits), 4), "step_s": round(statistics.median(totals), 4),
            "data_share": round(sum(waits) / sum(totals), 3), "steps": len(totals)}


def step_times(work: Path) -> list[dict]:
    """Median train step on in-memory batches (no loading): tiny VTC, tiny VTC+VTM+MLM, small VTC+VTM+MLM."""
    from evl.data.datasets import ClipSettings, VideoTextDataset

    out = []
    data = work / "synthvl"
    for name, objectives, batch in (("tiny", {"vtc": 1.0}, 32), ("tiny", {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, 32),
                                    ("small", {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, 8)):
        objective, opt, collate = _objective(name, objectives)
        model_cfg = objective.model.cfg.video
        ds = VideoTextDataset.from_file(data / "annotations" / "pretrain.json", data / "videos",
                                        ClipSettings(num_frames=model_cfg.num_frames, size=model_cfg.image_size,
                                                     train=True), "caption")
        batch_data = collate([ds[i] for i in range(batch)])
        precision, autocast = _autocast()
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            _step(objective, opt, batch_data, autocast)
            if i:
                times.append(time.perf_counter() - t0)
        out.append({"model": name, "objectives": objectives, "batch": batch, "precision": precision,
                    "step_s": round(statistics.median(times), 4)})
        print(f"train step {name} {'+'.join(objectives)} b{batch}: {out[-1]['step_s']:.3f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evl-data-loading")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    meta = run_meta(seeds=[0])
    args.work.mkdir(parents=True, exist_ok=True)
    sources = _sources(args.work, args.clips)
    videos = args.work / "synthvl" / "videos"
    rows = []
    for label, source in sources.items():
        for workers in (0, 1, 2):
            ds = _dataset(source, videos, workers)
            _, _, collate = _objective("tiny", {"vtc": 1.0})
            row = {"source": label, "workers": workers, **loader_only(ds, collate, workers, args.batches)}
            row["in_training"] = training_share(_dataset(source, videos, workers), workers, args.steps)
            rows.append(row)
            print(f"{label:20s} workers {workers}: {row['clips_per_s']:7.1f} clips/s, {row['ms_per_batch']:6.1f} ms "
                  f"per batch of {BATCH}, peak RSS {row['peak_rss_mb']:.0f} MB; in training: data "
                  f"{100 * row['in_training']['data_share']:.0f}% of the step "
                  f"({row['in_training']['step_s']:.3f} s)", flush=True)
    steps = step_times(args.work)
    result = {"meta": finish_meta(meta), "settings": {"clips": args.clips, "batch": BATCH, "frames": FRAMES,
                                                       "size": SIZE, "batches": args.batches, "steps": args.steps},
              "rows": rows, "train_step": steps}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
