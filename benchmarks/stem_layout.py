"""The conv stem's memory layout: forward + backward time of the `tiny` video embedding (stem + tubelet
projection + positions) at batch 32 × 8 frames of 64×64, with the stem's convolutions in NCHW (as first
built) and in channels-last (as evl runs them), fp32 and bf16 autocast, the two layouts interleaved.

    python benchmarks/stem_layout.py [--repeats 3] [--iters 6]

Writes benchmarks/results/stem_layout.json: milliseconds per forward + backward, per repeat and median.
The CPU kind and thread count are in the meta; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _meta import finish_meta, run_meta  # noqa: E402


def nchw(stem, frames: torch.Tensor, frame_mask=None) -> torch.Tensor:
    """The stem as first built: the convolutions on a contiguous NCHW batch."""
    b, t = frames.shape[:2]
    x = F.gelu(stem.conv2(F.gelu(stem.conv1(frames.flatten(0, 1)))))
    return x.view(b, t, *x.shape[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6)
    args = ap.parse_args()
    from evl.models.video import ConvStem, VideoEncoder, VideoEncoderConfig

    meta = run_meta()
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(image_size=64, patch_size=16, tubelet_size=2, num_frames=8,
                                          hidden_size=192, num_layers=4, num_heads=3, conv_stem=32))
    x = torch.randn(32, 8, 3, 64, 64)
    layouts = {"nchw": nchw, "channels_last": ConvStem.forward}
    ms: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeats):
            for dtype in ("fp32", "bf16"):
                for name, fwd in layouts.items():
                    ConvStem.forward = fwd
                    for i in range(args.iters + 2):
                        if i == 2:
                            t0 = time.perf_counter()
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                            out = enc.embed(x).x
                        out.float().sum().backward()
                    ms.setdefault(f"{dtype}/{name}", []).append(round((time.perf_counter() - t0) / args.iters * 1e3, 1))
    finally:
        ConvStem.forward = layouts["channels_last"]
    result = {"meta": finish_meta(meta), "batch": [32, 8, 3, 64, 64], "iters": args.iters,
              "ms_per_repeat": ms, "median_ms": {k: statistics.median(v) for k, v in ms.items()}}
    (HERE / "results" / "stem_layout.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_ms"]))


if __name__ == "__main__":
    main()
