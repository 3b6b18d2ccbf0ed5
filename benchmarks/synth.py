"""SynthVL generator throughput: clips/s for generation alone and for generation + H.264 encoding.

Usage: python benchmarks/synth.py [--clips 2000] [--out DIR] [--workers 1 2]
Prints a table and writes benchmarks/results/synth.json. Timings depend on the machine and its load;
they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from evl.data.synthetic import SynthConfig, generate_synthvl, write_synthvl

RESULTS = Path(__file__).resolve().parent / "results" / "synth.json"


def time_generation(clips: int, seed: int, cfg: SynthConfig) -> dict:
    """Plan, render and annotate in memory (no files): the cost of producing the pixels and text."""
    start = time.perf_counter()
    generate_synthvl(clips, seed=seed, cfg=cfg, render=True)
    seconds = time.perf_counter() - start
    return {"stage": "generate (in memory)", "workers": 1, "seconds": round(seconds, 2),
            "clips_per_s": round(clips / seconds, 1)}


def time_writing(clips: int, seed: int, cfg: SynthConfig, out: Path, workers: int) -> dict:
    """The full `evl synth`: generation, annotation files and mp4 encoding with `workers` processes."""
    start = time.perf_counter()
    write_synthvl(out, clips=clips, seed=seed, workers=workers, cfg=cfg)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (out / "videos").glob("*.mp4"))
    return {"stage": "generate + encode + write", "workers": workers, "seconds": round(seconds, 2),
            "clips_per_s": round(clips / seconds, 1), "video_mib": round(size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[args.seed], precision="n/a (no model)")
    cfg = SynthConfig(frames=args.frames, size=args.size)

    rows = [time_generation(args.clips, args.seed, cfg)]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for w in args.workers:
            rows.append(time_writing(args.clips, args.seed, cfg, base / f"synthvl_w{w}", w))

    print(f"SynthVL, {args.clips} clips, {args.frames}x{args.size}x{args.size}, {os.cpu_count()} CPUs")
    print(f"{'stage':28s} {'workers':>7s} {'seconds':>8s} {'clips/s':>8s}")
    for r in rows:
        print(f"{r['stage']:28s} {r['workers']:7d} {r['seconds']:8.2f} {r['clips_per_s']:8.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": finish_meta(meta), "benchmark": "synth", "clips": args.clips, "frames": args.frames, "size": args.size,
              "cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": list(os.getloadavg()),
              "rows": rows}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
