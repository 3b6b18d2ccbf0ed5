"""Inference speed and the accuracy it keeps: one retrieval checkpoint run five ways (issue 26).

    eager fp32      `evl.load(CKPT)` (PyTorch, fp32)
    eager bf16      the same under CPU autocast bf16 — only where the CPU runs bf16 natively (AMX /
                    AVX512-BF16; `evl.precision.cpu_runs_bf16_natively`), else the row says why not
    torch.compile   the dual encoders compiled by inductor (fp32; compile time reported apart)
    onnx fp32       `evl export` → `evl.load(DIR, backend="onnx")` (ONNX Runtime)
    onnx int8       `evl.load(DIR, backend="onnx-int8")` (dynamic int8 MatMul/Gemm weights)

For each: video-encoder clips/s at batch 1 and 32 and ms per text query at batch 1 and per text at
batch 32, from preprocessed inputs (decoding excluded; decode + preprocess per clip is timed once
apart); the median of `--repeats` timed calls after a warm-up, the backends interleaved call by call
so a load change hits all of them alike; and text→video R@1/R@5 on the test split computed from that
backend's own embeddings (every caption against every test clip), with the paired difference to eager
fp32 and a 95% bootstrap interval over the caption queries. Threads: `--threads` for PyTorch and ONNX
Runtime alike (default 2).

Usage: python benchmarks/inference.py [--checkpoint runs/quickstart/retrieval/final]
       [--data runs/quickstart/synthvl/annotations/retrieval_test.json] [--videos DIR] [--repeats 30]
Writes benchmarks/results/inference.json (every pass kept: `passes`; the table is the median of all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "inference.json"
BACKENDS = ("eager fp32", "eager bf16", "torch.compile", "onnx fp32", "onnx int8", "onnx int8, half the frames")


def _encoders(name: str, ckpt: Path, export: Path, threads: int):
    """(video_fn(frames, mask), text_fn(list of str), note) for one backend, or (None, None, why not).
    Text functions tokenize too: what a text query costs."""
    import evl
    from evl.export import EncoderGraph
    from evl.precision import cpu_runs_bf16_natively

    if name.startswith("onnx"):
        folder = export.with_name("onnx-half") if "half" in name else export
        m = evl.load(folder, backend="onnx" if name == "onnx fp32" else "onnx-int8", threads=threads)
        return (lambda f, k: m.encode_video(f, k, batch_size=len(f))), (lambda t: m.encode_text(t, batch_size=len(t))), ""
    m = evl.load(ckpt)
    graph_v, graph_t = EncoderGraph(m.model, "encode_video").eval(), EncoderGraph(m.model, "encode_text").eval()

    def tokenized(f):
        def run(texts):
            tok = m.tokenize(texts)
            return f(tok.input_ids, tok.attention_mask)
        return run

    video, text = graph_v, tokenized(graph_t)
    if name == "eager fp32":
        return video, text, ""
    if name == "eager bf16":
        native, why = cpu_runs_bf16_natively()
        if not native:
            return None, None, f"not run: {why}"

        def bf16(f):
            def run(*a):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return f(*a).float()
            return run
        return bf16(video), bf16(text), why
    try:
        t0 = time.perf_counter()
        cv, ct = torch.compile(graph_v, dynamic=True), torch.compile(graph_t, dynamic=True)
        return cv, tokenized(ct), f"compiled lazily; first calls {time.perf_counter() - t0:.1f} s + warm-up"
    except Exception as e:   # inductor needs a C++ compiler
        return None, None, f"not run: torch.compile failed ({type(e).__name__}: {e})"


def _inputs(model, records, videos: Path):
    """Preprocessed frames of every test clip (decode + preprocess timed), and the captions."""
    t0 = time.perf_counter()
    clips = [model.preprocess(videos / r.video) for r in records]
    decode_ms = 1000 * (time.perf_counter() - t0) / len(records)
    frames, masks = torch.stack([c[0] for c in clips]), torch.stack([c[1] for c in clips])
    captions, owner = [], []
    for i, r in enumerate(records):
        captions += r.captions
        owner += [i] * len(r.captions)
    return frames, masks, captions, torch.tensor(owner), decode_ms


@torch.no_grad()
def _embed(fn, items: tuple, batch: int) -> torch.Tensor:
    n = len(items[0])
    return torch.cat([fn(*(t[i:i + batch] for t in items)).float() for i in range(0, n, batch)])


def _ranks(video: torch.Tensor, text: torch.Tensor, owner: torch.Tensor) -> np.ndarray:
    sims = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(video, dim=-1).T
    true = sims[torch.arange(len(owner)), owner]
    return ((sims > true[:, None]).sum(dim=1) + 1).numpy()


def _boot(hits: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    means = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n)]
    return [round(100 * float(np.percentile(means, q)), 1) for q in (2.5, 97.5)]


@torch.no_grad()
def _clips(f, frames, masks, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n preprocessed clips, at the frame count this backend reads (f[2])."""
    return frames[f[2]][:n], masks[f[2]][:n]


def run_pass(args, fns: dict, frames, masks, captions: list[str], repeats: int) -> dict:
    """Median timings of every available backend, interleaved call by call."""
    times = {name: {"video_b1": [], "video_b32": [], "text_b1": [], "text_b32": []} for name in fns}
    calls = {"video_b1": lambda f: f[0](*_clips(f, frames, masks, 1)), "video_b32": lambda f: f[0](*_clips(f, frames, masks, 32)),
             "text_b1": lambda f: f[1](captions[:1]), "text_b32": lambda f: f[1](captions[:32])}
    for f in fns.values():   # warm-up (and torch.compile's compilation)
        for _ in range(3):
            for call in calls.values():
                call(f)
    for _ in range(repeats):
        for key, call in calls.items():
            for name, f in fns.items():
                t0 = time.perf_counter()
                call(f)
                times[name][key].append(time.perf_counter() - t0)
    out = {}
    for name, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        out[name] = {"video_clips_per_s_b1": round(1 / med["video_b1"], 1),
                     "video_clips_per_s_b32": round(32 / med["video_b32"], 1),
                     "text_ms_b1": round(1000 * med["text_b1"], 3), "text_ms_per_text_b32": round(1000 * med["text_b32"] / 32, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/quickstart/retrieval/final"))
    ap.add_argument("--data", type=Path, default=Path("runs/quickstart/synthvl/annotations/retrieval_test.json"))
    ap.add_argument("--videos", type=Path, default=None, help="default: the annotation folder's ../videos")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--index", action="store_true", help="also time `evl index` of the test videos per backend")
    ap.add_argument("--supersede", default=None, help="why the earlier passes in --json no longer count (they are "
                    "kept under superseded_passes)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    import evl
    from evl.data.annotations import read_annotations
    from evl.export import export_onnx

    torch.set_num_threads(args.threads)
    meta = run_meta(precision="per row")
    videos = args.videos or args.data.parent.parent / "videos"
    records = read_annotations(args.data)
    eager = evl.load(args.checkpoint)
    frames, masks, captions, owner, decode_ms = _inputs(eager, records, videos)
    half = max(eager.model.cfg.video.tubelet_size, eager.num_frames // 2)
    eager.num_frames, full = half, eager.num_frames
    frames_half, masks_half, *_ = _inputs(eager, records, videos)
    frames, masks = {full: frames, half: frames_half}, {full: masks, half: masks_half}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export = export_onnx(args.checkpoint, Path(tmp) / "onnx")
        export_s = time.perf_counter() - t0
        export_onnx(args.checkpoint, Path(tmp) / "onnx-half", num_frames=half)
        fns = {}
        for name in BACKENDS:
            v, t, note = _encoders(name, args.checkpoint, Path(tmp) / "onnx", args.threads)
            rows[name] = {"note": note}
            if v is not None:
                fns[name] = (v, t, half if "half" in name else full)
                rows[name]["frames"] = fns[name][2]
        rng = np.random.default_rng(0)
        ref_ranks = None
        for name, (v, t, n) in fns.items():
            ranks = _ranks(_embed(v, (frames[n], masks[n]), 32), _embed(t, (captions,), 64), owner)
            hits = (ranks == 1).astype(float)
            rows[name].update(t2v_r1=round(100 * hits.mean(), 1), t2v_r1_ci95=_boot(hits, rng),
                              t2v_r5=round(100 * float((ranks <= 5).mean()), 1))
            if ref_ranks is None:
                ref_ranks = ranks
            else:
                diff = hits - (ref_ranks == 1)
                rows[name]["t2v_r1_minus_eager_fp32"] = round(100 * diff.mean(), 1)
                rows[name]["t2v_r1_minus_eager_fp32_ci95"] = [round(x, 1) for x in _boot_diff(diff, rng)]
        index_s = time_index(args, videos, Path(tmp)) if args.index else None
        previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
        same = previous.get("checkpoint") == str(args.checkpoint.resolve()) and previous.get("data") == str(args.data.resolve())
        superseded = previous.get("superseded_passes", []) if same else []
        if same and args.supersede:   # earlier passes measured something since fixed: kept, out of the table
            superseded += [{**p, "superseded_because": args.supersede} for p in previous.get("passes", [])]
        passes = (previous.get("passes", []) if same and not args.supersede else []) + [{
            "meta": finish_meta(meta), "timing": run_pass(args, fns, frames, masks, captions, args.repeats),
            "index_s": index_s}]
    for name in fns:
        for key in passes[-1]["timing"][name]:
            rows[name][key] = round(statistics.median(p["timing"][name][key] for p in passes if name in p["timing"]), 3)
    base = rows["eager fp32"]
    for name in fns:
        rows[name]["video_speedup_b1"] = round(rows[name]["video_clips_per_s_b1"] / base["video_clips_per_s_b1"], 2)
        rows[name]["video_speedup_b32"] = round(rows[name]["video_clips_per_s_b32"] / base["video_clips_per_s_b32"], 2)
    out = {"meta": finish_meta(meta), "checkpoint": str(args.checkpoint.resolve()), "data": str(args.data.resolve()),
           "test_clips": len(records), "queries": len(captions), "decode_preprocess_ms_per_clip": round(decode_ms, 2),
           "export_s": round(export_s, 1), "export_parity": export["parity"], "index_s": index_s, "rows": rows,
           "passes": passes, "superseded_passes": superseded}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'backend':15s} {'clips/s b1':>10s} {'clips/s b32':>11s} {'x b1':>6s} {'x b32':>6s} {'text ms b1':>10s} "
          f"{'ms/text b32':>11s} {'R@1':>6s} {'ΔR@1 [95%]':>18s}")
    for name, r in rows.items():
        if "video_clips_per_s_b1" not in r:
            print(f"{name:15s} {r['note']}")
            continue
        d = r.get("t2v_r1_minus_eager_fp32")
        ci = r.get("t2v_r1_minus_eager_fp32_ci95")
        print(f"{name:15s} {r['video_clips_per_s_b1']:10.1f} {r['video_clips_per_s_b32']:11.1f} {r['video_speedup_b1']:6.2f} "
              f"{r['video_speedup_b32']:6.2f} {r['text_ms_b1']:10.3f} {r['text_ms_per_text_b32']:11.3f} {r['t2v_r1']:6.1f} "
              + (f"{d:+6.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]" if d is not None else f"{'-':>18s}"))
    print(f"decode + preprocess: {decode_ms:.2f} ms per clip; evl index of the test videos (s): {index_s}; wrote {args.json}")


def time_index(args, videos: Path, tmp: Path) -> dict:
    """Wall seconds of `evl index` over the test videos with each backend (decoding included), once each."""
    from evl.search.index import build_index

    out = {}
    for backend, model in (("torch", args.checkpoint), ("onnx", tmp / "onnx"), ("onnx-int8", tmp / "onnx")):
        t0 = time.perf_counter()
        build_index(videos, model, tmp / f"index-{backend}", backend=backend)
        out[backend] = round(time.perf_counter() - t0, 1)
    return out


def _boot_diff(diff: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)]
    return [100 * float(np.percentile(means, q)) for q in (2.5, 97.5)]


if __name__ == "__main__":
    main()
