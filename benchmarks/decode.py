"""Decode throughput: clips/s to open a video and sample 8 frames, PyAV vs decord.

Two workloads: SynthVL-like clips (16 frames, 64x64, moving shapes) and longer clips (300 frames,
640x360, keyframe every 30 frames, B-frames). PyAV is measured with the seek planner ("auto") —
with the packet table cached (every epoch after the first) and cold (first visit) — and decoding
from the start ("sequential"). Single-threaded decoders, as inside a DataLoader worker.

    python benchmarks/decode.py --clips 100 --repeats 5 --out benchmarks/results/decode.json

Not a test: timings depend on the machine. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evl.data import video_pyav as video_mod  # the PyAV backend's internals
from evl.data.video import load_clip
from evl.data.video_writer import write_video


def moving_shapes(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a few coloured rectangles drifting over a gradient background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                           np.full_like(xx, 64)], -1).astype(np.uint8)
    shapes = [(rng.integers(0, height), rng.integers(0, width), rng.integers(-3, 4), rng.integers(-3, 4),
               rng.integers(height // 8, height // 3), rng.integers(0, 256, 3)) for _ in range(3)]
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        for y0, x0, dy, dx, size, color in shapes:
            y, x = int((y0 + dy * t * height / 64) % height), int((x0 + dx * t * width / 64) % width)
            frames[t, y: y + size, x: x + size] = color
    return frames


def make_videos(root: Path, n: int, num_frames: int, height: int, width: int, gop: int, bframes: int,
                fps: float) -> list[Path]:
    return [write_video(root / f"v{num_frames}_{i}.mp4", moving_shapes(num_frames, height, width, i),
                        fps=fps, gop=gop, bframes=bframes, crf=23) for i in range(n)]


def clips_per_second(paths: list[Path], clips: int, decode: Callable[[Path, random.Random], object]) -> float:
    rng = random.Random(0)
    decode(paths[0], rng)  # warm-up: imports, FFmpeg initialisation
    start = time.perf_counter()
    for i in range(clips):
        decode(paths[i % len(paths)], rng)
    return clips / (time.perf_counter() - start)


def methods() -> dict[str, Callable[[Path, random.Random], object]]:
    def cold(path: Path, rng: random.Random) -> object:
        video_mod._TABLE_CACHE.clear()
        return load_clip(path, 8, "random", rng=rng)

    return {
        "pyav auto (table cached)": lambda p, r: load_clip(p, 8, "random", rng=r),
        "pyav auto (cold)": cold,
        "pyav sequential": lambda p, r: load_clip(p, 8, "random", rng=r, seek="sequential"),
        "decord": lambda p, r: load_clip(p, 8, "random", rng=r, backend="decord"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    parser.add_argument("--clips", type=int, default=100, help="decode calls per method for short clips "
                        "(a quarter of that for long ones)")
    parser.add_argument("--repeats", type=int, default=5, help="passes over every method, interleaved; the "
                        "JSON keeps every pass and the median")
    args = parser.parse_args()
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[0])   # videos v*_{i} from seed i, frame picks from random.Random(0)

    passes: dict[str, dict[str, list[float]]] = {}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workloads = {
            "synthvl 16f 64x64": (make_videos(root, 8, 16, 64, 64, gop=4, bframes=0, fps=8), args.clips),
            "long 300f 640x360": (make_videos(root, 2, 300, 360, 640, gop=30, bframes=2, fps=30),
                                  max(1, args.clips // 4)),
        }
        for name, (paths, n) in workloads.items():
            passes[name] = {m: [] for m in methods()}
            for _ in range(args.repeats):   # A, B, C, D, A, B, ...: background load hits every method alike
                for method, fn in methods().items():
                    try:
                        passes[name][method].append(round(clips_per_second(paths, n, fn), 1))
                    except Exception as e:  # decord missing or broken: report, keep going
                        passes[name][method].append(float("nan"))
                        print(f"{method} on {name}: {e}")
            results[name] = {m: round(statistics.median(v), 1) for m, v in passes[name].items()}

    names = list(methods())
    print(f"median of {args.repeats} interleaved passes")
    print(f"{'workload':<20}" + "".join(f"{m:>26}" for m in names) + "   (clips/s, 8 frames each)")
    for workload, row in results.items():
        print(f"{workload:<20}" + "".join(f"{row[m]:>26.1f}" for m in names))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": finish_meta(meta),
                                    "unit": "clips/s (8 random-segment frames, 1 decoder thread)",
                                    "clips": args.clips, "repeats": args.repeats, "machine": platform.machine(),
                                    "processor": platform.processor(), "results": results,
                                    "results_note": "median of the passes; every pass in 'passes'",
                                    "passes": passes}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
