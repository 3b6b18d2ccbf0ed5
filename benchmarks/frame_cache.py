"""What the decoded-frame cache (`data.frame_cache_mb`) saves in a real pre-training run.

    python benchmarks/frame_cache.py [--steps 220] [--repeats 3] [--cache-mb 1024] [--train-clips 350]

On the quickstart's SynthVL draw (seed 0: 16-frame 64² clips, 50 val / 100 test clips and `--train-clips`
training clips; `pretrain.json` holds 5 captions per clip, so an epoch is 5 × train-clips samples), the
quickstart's pre-training recipe (`pretrain-tiny-lit`, batch 32, `train.num_workers: 0` as packaged) runs
`--steps` steps with the cache off and on, `--repeats` times, alternating which goes first, in one
process (the process cache is emptied before every run). Per run: the step time (data loading included:
the Trainer's own clips/s) over the first epoch and over the later ones, the whole run's training time,
the cache's hits / misses / bytes at the end, and whether the logged losses equal the uncached run's of
the same repeat (with 2 threads the tiny run is not bit-reproducible on every CPU: see docs/efficiency.md).
Writes benchmarks/results/frame_cache.json (every run; the summary: medians over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _meta import finish_meta, run_meta  # noqa: E402

RESULTS = HERE / "results" / "frame_cache.json"
VAL, TEST, BATCH = 50, 100, 32


def data_dir(work: Path, train: int) -> Path:
    from evl.data.synthetic import SynthConfig, write_synthvl

    d = work / f"synthvl-{train}"
    if not (d / "meta.json").is_file():
        write_synthvl(d, clips=train + VAL + TEST, seed=0, cfg=SynthConfig(split_fractions=(train, VAL, TEST)),
                      workers=2)
    return d


def one_run(data: Path, out: Path, steps: int, cache_mb: float) -> dict:
    from evl.data.frame_cache import frame_cache
    from evl.recipes import load_recipe, run_recipe

    cache = frame_cache(0)
    cache.clear()
    cache.capacity = 0
    ann = data / "annotations"
    cfg = load_recipe("pretrain-tiny-lit", [f"data.train={ann / 'pretrain.json'}", f"data.videos={data / 'videos'}",
                                            f"data.frame_cache_mb={cache_mb}", f"train.max_steps={steps}",
                                            f"train.out_dir={out}", "train.overwrite=true", "train.ckpt_every=0",
                                            "train.log_every=1"])
    res = run_recipe(cfg, evaluate=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "step" in r and r.get("clips_per_s")]
    records = len(json.loads((ann / "pretrain.json").read_text()))
    per_epoch = records // BATCH
    step_s = [BATCH / r["clips_per_s"] for r in rows]
    return {"cache_mb": cache_mb, "steps": res["steps"], "steps_per_epoch": per_epoch,
            "train_s": round(res["train_time_s"], 1),
            "step_s_first_epoch": round(statistics.median(step_s[1:per_epoch]), 4),
            "step_s_later_epochs": round(statistics.median(step_s[per_epoch:]), 4) if len(step_s) > per_epoch else None,
            "step_s_mean": round(sum(step_s) / len(step_s), 4),
            "cache": {"hits": cache.hits, "misses": cache.misses, "mb": round(cache.bytes / 2**20, 1), "frames": len(cache)},
            "losses": [r["loss"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=220)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-mb", type=float, default=1024)
    ap.add_argument("--train-clips", type=int, default=350)
    ap.add_argument("--work", type=Path, default=Path("runs/frame_cache"))
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    from evl.precision import resolve_precision

    meta = run_meta(seeds=[0], precision=resolve_precision("auto", "cpu").name)
    data = data_dir(args.work, args.train_clips)
    runs = []
    for rep in range(args.repeats):
        order = (0, args.cache_mb) if rep % 2 == 0 else (args.cache_mb, 0)
        done = {}
        for mb in order:
            done[mb] = one_run(data, args.work / f"r{rep}-c{mb:g}", args.steps, mb)
            print(json.dumps({k: v for k, v in done[mb].items() if k != "losses"}), flush=True)
        done[args.cache_mb]["losses_equal_uncached"] = done[args.cache_mb]["losses"] == done[0]["losses"]
        runs += [{"repeat": rep, **done[mb]} for mb in order]
    summary = {}
    for mb in (0, args.cache_mb):
        mine = [r for r in runs if r["cache_mb"] == mb]
        summary[f"cache_{mb:g}mb"] = {k: round(statistics.median(r[k] for r in mine), 4)
                                     for k in ("train_s", "step_s_first_epoch", "step_s_later_epochs", "step_s_mean")}
    off, on = summary["cache_0mb"], summary[f"cache_{args.cache_mb:g}mb"]
    summary["speedup_later_epochs"] = round(off["step_s_later_epochs"] / on["step_s_later_epochs"], 2)
    summary["speedup_whole_run"] = round(off["train_s"] / on["train_s"], 2)
    out = {"meta": finish_meta(meta), "settings": {"steps": args.steps, "repeats": args.repeats, "cache_mb": args.cache_mb,
                                                   "train_clips": args.train_clips, "recipe": "pretrain-tiny-lit"},
           "summary": summary, "runs": runs}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
