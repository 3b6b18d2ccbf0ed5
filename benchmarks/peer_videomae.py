"""Forward throughput of evl's VideoEncoder vs `transformers.VideoMAEModel` at the same config.

Both models get the same weights (imported with `load_videomae_state_dict`) and the same input, in one
run; evl runs its joint layout, which computes the same function (checked here: max abs diff). Warm-up,
then the median of timed repeats; clips/s and evl/HF ratio are printed and written as JSON.

    python benchmarks/peer_videomae.py --sizes small vit-s --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from evl.models.video import VideoEncoder, VideoEncoderConfig
from evl.models.videomae import load_videomae_state_dict

SIZES = {
    # ViT-S/16, 16 frames 224² — VideoMAE-S (1568 tokens)
    "vit-s": dict(image_size=224, patch_size=16, num_frames=16, hidden_size=384, num_hidden_layers=12,
                  num_attention_heads=6, intermediate_size=1536),
    # a CPU-friendly one: 8 frames 112², 6 layers (196 tokens)
    "small": dict(image_size=112, patch_size=16, num_frames=8, hidden_size=384, num_hidden_layers=6,
                  num_attention_heads=6, intermediate_size=1536),
}


def build_pair(size: str) -> tuple[torch.nn.Module, VideoEncoder, dict]:
    from transformers import VideoMAEConfig, VideoMAEModel

    hc = VideoMAEConfig(tubelet_size=2, use_mean_pooling=False, attn_implementation="sdpa", **SIZES[size])
    torch.manual_seed(0)
    hf = VideoMAEModel(hc).eval()
    enc = VideoEncoder(VideoEncoderConfig.from_videomae(hc)).eval()
    load_videomae_state_dict(enc, hf.state_dict())
    return hf, enc, SIZES[size]


def time_forward(fn, inputs: torch.Tensor, warmup: int, repeats: int, device: torch.device) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def bench(size: str, device: torch.device, batch: int, warmup: int, repeats: int, dtype: torch.dtype) -> dict:
    hf, enc, shape = build_pair(size)
    hf, enc = hf.to(device, dtype), enc.to(device, dtype)
    frames = torch.randn(batch, shape["num_frames"], 3, shape["image_size"], shape["image_size"],
                         device=device, dtype=dtype)
    with torch.inference_mode():
        diff = (enc(frames).tokens - hf(pixel_values=frames).last_hidden_state).abs().max().item()
    # interleave the two models so background load affects both alike
    evl_t, hf_t = [], []
    for _ in range(repeats):
        evl_t += time_forward(lambda x: enc(x), frames, warmup, 1, device)
        hf_t += time_forward(lambda x: hf(pixel_values=x), frames, warmup, 1, device)
        warmup = 0
    evl_s, hf_s = statistics.median(evl_t), statistics.median(hf_t)
    tokens = (shape["num_frames"] // 2) * (shape["image_size"] // shape["patch_size"]) ** 2
    return dict(size=size, device=str(device), dtype=str(dtype).removeprefix("torch."), batch=batch,
                tokens=tokens, layers=shape["num_hidden_layers"], hidden=shape["hidden_size"],
                evl_clips_per_s=batch / evl_s, hf_clips_per_s=batch / hf_s, ratio_evl_over_hf=hf_s / evl_s,
                evl_median_s=evl_s, hf_median_s=hf_s, evl_min_s=min(evl_t), hf_min_s=min(hf_t),
                max_abs_diff=diff, repeats=repeats, evl_times_s=[round(t, 5) for t in evl_t],
                hf_times_s=[round(t, 5) for t in hf_t],
                ratio_per_repeat=[round(h / e, 3) for e, h in zip(evl_t, hf_t, strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "vit-s"], choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peer_videomae.json")
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import finish_meta, run_meta

    run = run_meta(seeds=[0], precision="fp32 on CPU, bf16 on CUDA")   # weights from torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    for dev in devices:
        device = torch.device(dev)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for size in args.sizes:
            row = bench(size, device, args.batch, args.warmup, args.repeats, dtype)
            rows.append(row)
            print(f"{row['size']:6s} {row['device']:5s} {row['dtype']:8s} B={row['batch']} tokens={row['tokens']:5d} "
                  f"evl {row['evl_clips_per_s']:8.2f} clips/s | HF {row['hf_clips_per_s']:8.2f} clips/s | "
                  f"evl/HF {row['ratio_evl_over_hf']:.2f}x | max|diff| {row['max_abs_diff']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                processor=platform.processor())
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    args.out.write_text(json.dumps(dict(meta={**finish_meta(run), **meta}, results=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
