"""Training-step throughput: clips/s, time split into data / forward / backward / optimiser, and the
achieved GFLOP/s against this machine's measured matmul peak (fp32 and bf16).

Usage: python benchmarks/train_step.py [--models tiny small] [--steps 4] [--objectives vtc,vtm,mlm]
Prints a table and writes benchmarks/results/train_step.json. This is the baseline that token
sparsification (SMAUG) is measured against. Timings depend on the machine and its load; the CPU
(model, SIMD capability, bf16 flags) and the precision used are written beside them.

`--model-override KEY=VALUE ...` (repeatable) adds a row of the same model with those model-config overrides,
e.g. the quickstart's stem against none: `--model-override text.locked_layers=1 --model-override
text.locked_layers=1 video.conv_stem=32 --objectives vtc --models tiny`.

`--no-mask-ablation` skips the side-by-side row that feeds the old all-valid frame mask (which made
attention build a key mask and miss SDPA's unmasked fast path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
BATCH = {"tiny": 32, "small": 8, "tiny-backbone": 32, "base": 2}


def _clips(model_cfg, n: int, out: Path):
    """A SynthVL set at the model's frame size (generated, never downloaded)."""
    from evl.data.datasets import ClipSettings, VideoTextDataset
    from evl.data.synthetic import write_synthvl

    size = model_cfg.video.image_size
    folder = out / f"synth{size}"
    if not (folder / "annotations" / "pretrain.json").is_file():
        write_synthvl(folder, clips=max(n, 12), seed=0, frames=16, size=size)
    clip = ClipSettings(num_frames=model_cfg.video.num_frames, size=size, train=True)
    return VideoTextDataset.from_file(folder / "annotations" / "pretrain.json", folder / "videos", clip, "caption")


def _flops(objective, batch) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective(batch)["loss"].backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_model(name: str, objectives: dict, steps: int, out: Path, all_valid_mask: bool = False,
                progress: float = 1.0, overrides: list[str] | None = None) -> dict:
    """Median step time of `objectives` on model `name` (with `overrides`, model-config KEY=VALUE items);
    `progress` is the training fraction the step reports to scheduled terms (1.0: e.g. sparsification at
    its final keep rate)."""
    from evl.config import deep_merge, from_dict, load_yaml, parse_overrides
    from evl.data.datasets import Collator
    from evl.data.text import tokenizer_for
    from evl.models.model import ModelConfig, VideoLanguageModel
    from evl.precision import resolve_precision
    from evl.train.objective import TrainObjective

    torch.manual_seed(0)
    config = deep_merge(load_yaml(name, "models"), parse_overrides(overrides or []))
    model = VideoLanguageModel(from_dict(ModelConfig, config, where=name))
    tokenizer = tokenizer_for(model.cfg)
    objective = TrainObjective.from_spec(model, objectives, tokenizer).train()
    precision = resolve_precision("auto", "cpu")
    b = BATCH.get(name, 8)
    data = _clips(model.cfg, b, out)
    collate = Collator(tokenizer, 32, transforms=objective.batch_transforms())
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5)
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    autocast = dict(device_type="cpu", dtype=precision.autocast_dtype or torch.bfloat16,
                    enabled=precision.autocast_dtype is not None)
    batch = None
    for step in range(steps + 1):            # step 0 warms up
        t0 = time.perf_counter()
        batch = collate([data[(step * b + i) % len(data)] for i in range(b)])
        if all_valid_mask:
            batch["frame_mask"] = torch.ones(batch["frames"].shape[:2], dtype=torch.bool)
        batch["train_progress"] = progress
        t1 = time.perf_counter()
        with torch.autocast(**autocast):
            loss = objective(batch)["loss"]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    flops = _flops(objective, batch)
    return {"model": name, **({"overrides": overrides} if overrides else {}), "batch": b, "objectives": objectives,
            "precision": precision.name,
            "frame_mask": "all-valid mask (old)" if all_valid_mask else "none when unpadded",
            "seconds": {k: round(v, 4) for k, v in med.items()}, "step_s": round(total, 4),
            "clips_per_s": round(b / total, 2), "gflop_per_step": round(flops / 1e9, 2),
            "achieved_gflops": round(flops / 1e9 / (med["forward"] + med["backward"]), 1)}


def main() -> None:
    from evl.precision import cpu_info, cpu_runs_bf16_natively, measure_matmul_gflops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--objectives", default="vtc,vtm,mlm")
    ap.add_argument("--no-mask-ablation", action="store_true")
    ap.add_argument("--model-override", nargs="+", default=[], metavar="KEY=VALUE", action="append",
                    help="one more row per use: the model(s) with these model-config overrides "
                         "(e.g. video.conv_stem=32 text.locked_layers=1), measured after the plain row")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=[0])   # torch.manual_seed(0) for every model; data: SynthVL seed 0
    objectives = {name: 1.0 for name in args.objectives.split(",") if name}
    native_bf16, why = cpu_runs_bf16_natively()
    # the peak is the best of three medians: on a shared machine a single measurement can land in a
    # busy moment and make the step look faster than "peak"
    peak = {"fp32": round(max(measure_matmul_gflops(torch.float32, 1024) for _ in range(3)), 1),
            "bf16": round(measure_matmul_gflops(torch.bfloat16, 1024 if native_bf16 else 256, repeats=3), 1)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "tiny" and not args.no_mask_ablation:
                # old path first, so the new one does not get the benefit of a warmer machine
                rows.append(bench_model(name, objectives, args.steps, Path(tmp), all_valid_mask=True))
            rows.append(bench_model(name, objectives, args.steps, Path(tmp)))
            for extra in args.model_override:
                rows.append(bench_model(name, objectives, args.steps, Path(tmp), overrides=extra))
    info = cpu_info()
    print(f"CPU: {info['model']} ({info['capability']}, bf16 flags {info['flags_bf16']}, {info['cores']} cores), "
          f"torch {info['torch']}; bf16: {why}")
    print(f"measured matmul peak: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s")
    head = f"{'model':14s} {'batch':>5s} {'prec':>5s} {'mask':>22s} {'clips/s':>8s} {'data':>6s} {'fwd':>6s} " \
           f"{'bwd':>6s} {'optim':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'% peak':>6s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r["seconds"]
        pct = 100 * r["achieved_gflops"] / peak[r["precision"]]
        label = r["model"] + "".join(f" {o}" for o in r.get("overrides", []))
        print(f"{label:14s} {r['batch']:5d} {r['precision']:>5s} {r['frame_mask']:>22s} {r['clips_per_s']:8.2f} "
              f"{s['data']:6.3f} {s['forward']:6.3f} {s['backward']:6.3f} {s['optimizer']:6.3f} "
              f"{r['gflop_per_step']:7.1f} {r['achieved_gflops']:8.1f} {pct:6.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "cpu": info, "bf16_native": native_bf16, "bf16_reason": why,
                                     "matmul_peak_gflops": peak, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
