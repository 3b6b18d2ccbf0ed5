"""SMAUG's speed-up over the whole sparsification schedule, not only at its final keep rate.

`smaug_efficiency.py` times the mask+sparse step at `train_progress = 1`, where the keep rate has reached
its target. The recipe's keep rate follows a cosine from 1 to `keep_rate` over the first `rate_warmup`
of training (0.3 in `smaug-small`), so the early steps keep more tokens and cost more. This script times
one pre-training step (forward, backward, AdamW; `train_step.bench_model`, median of `--steps` steps
after a warm-up step) of the dense recipe and of the mask+sparse recipe at several training fractions,
each in a process of its own, and integrates the step time over the schedule (trapezoids over the
measured fractions; constant after `rate_warmup`):

    whole-schedule speed-up = dense step time ÷ ∫₀¹ t(p) dp

`--passes N` repeats the whole set of processes N times, interleaved (dense, p0, p1, …, dense, p0, …);
the JSON keeps every pass and reports the median per point.

Usage: python benchmarks/smaug_schedule.py [--model small] [--steps 5] [--passes 1]
Prints a table and writes benchmarks/results/smaug_schedule.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "smaug_schedule.json"


def one(model: str, config: str, progress: float, steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    from smaug_efficiency import objectives
    from train_step import bench_model

    from evl.techniques.smaug.sparsify import keep_rate_at

    spec = objectives(config, model)
    with tempfile.TemporaryDirectory() as tmp:
        row = bench_model(model, spec, steps, Path(tmp), progress=progress)
    sp = spec.get("sparsify")
    rate = keep_rate_at(progress, sp["keep_rate"], sp.get("rate_warmup", 0.3)) if isinstance(sp, dict) else None
    return {"config": config, "progress": progress, "keep_rate": rate, "step_s": row["step_s"],
            "clips_per_s": row["clips_per_s"], "batch": row["batch"], "precision": row["precision"],
            "gflop_per_clip": round(row["gflop_per_step"] / row["batch"], 2), "seconds": row["seconds"]}


def integrate(points: list[tuple[float, float]], warmup: float) -> float:
    """∫₀¹ t(p) dp, t piecewise linear between the measured fractions up to `warmup`, constant after."""
    pts = sorted((p, t) for p, t in points if p <= warmup)
    final = dict(points).get(1.0, pts[-1][1])
    area = sum((p1 - p0) * (t0 + t1) / 2 for (p0, t0), (p1, t1) in zip(pts, pts[1:], strict=False))
    return area + (1.0 - warmup) * final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--points", nargs="+", type=float, default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1.0])
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "PROGRESS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one[0], float(args.one[1]), args.steps)))
        return
    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, machine_line, run_meta
    from smaug_efficiency import objectives

    meta = run_meta(seeds=[0])   # bench_model: torch.manual_seed(0), SynthVL seed 0
    sp = objectives("mask+sparse", args.model)["sparsify"]
    warmup = float(sp.get("rate_warmup", 0.3))
    runs = []
    for n in range(args.passes):
        for config, progress in [("dense", 1.0)] + [("mask+sparse", p) for p in args.points]:
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--one", config,
                   str(progress)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append({"pass": n, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "seconds"}), flush=True)
    dense = statistics.median(r["step_s"] for r in runs if r["config"] == "dense")
    med = {p: statistics.median(r["step_s"] for r in runs if r["config"] == "mask+sparse" and r["progress"] == p)
           for p in args.points}
    whole = integrate(list(med.items()), warmup)
    summary = {"dense_step_s": dense, "sparse_step_s_by_progress": med,
               "speedup_at_final_rate": round(dense / med[max(args.points)], 2),
               "speedup_at_start": round(dense / med[min(args.points)], 2),
               "schedule_mean_step_s": round(whole, 4), "speedup_whole_schedule": round(dense / whole, 2),
               "rate_warmup": warmup, "keep_rate": sp["keep_rate"]}
    print(f"\n{machine_line(meta)}")
    print(f"{args.model}: dense {dense:.3f} s/step; mask+sparse at progress " +
          ", ".join(f"{p:g}: {t:.3f}" for p, t in med.items()))
    print(f"speed-up at the final keep rate {summary['speedup_at_final_rate']}x, over the whole schedule "
          f"{summary['speedup_whole_schedule']}x (first step {summary['speedup_at_start']}x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": finish_meta(meta), "model": args.model, "steps": args.steps,
                                     "passes": args.passes, "summary": summary, "runs": runs}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
