"""SMAUG's pre-training saving, measured side by side in one run: dense vs masking vs masking + sparsification.

Part 1 — throughput (per model, default tiny and small): clips/s, time per step, peak memory and GFLOPs
per training clip of one pre-training step (forward, backward, AdamW) with the objectives of the
recipes: dense = `pretrain-tiny` (VTC + VTM + MLM); mask = the SMAUG recipe without `sparsify` (+ video
MAE, one visible-patch forward shared by every loss); mask+sparse = the SMAUG recipe (`smaug-tiny` for
the tiny model, `smaug-small` for small). Each row runs in its own process, so peak memory (max RSS
on CPU, max allocated on CUDA) is that configuration's own. Sparsification is measured at its final
keep rate (the step reports `train_progress = 1`).

Part 2 — downstream (tiny model, SynthVL 500 clips): each configuration pre-trains for the same number
of steps, and again for the same wall-clock as the dense run (its steps scaled by part 1's time per step,
measured for each configuration in a process of its own); then zero-shot text→video R@1 on the held-out test split and open-ended QA accuracy after the same
QA fine-tuning (dense, from each checkpoint). At least two seeds; mean ± half-range per row.

Usage: python benchmarks/smaug_efficiency.py [--models tiny small] [--steps 5] [--seeds 0 1]
       [--pretrain-steps 100] [--qa-steps 150] [--clips 500] [--skip-throughput] [--skip-downstream]
Prints tables and writes benchmarks/results/smaug_efficiency.json; a part skipped with --skip-* keeps
its rows from the previous JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "smaug_efficiency.json"
RECIPE = {"tiny": "smaug-tiny", "small": "smaug-small"}
CONFIGS = ("dense", "mask", "mask+sparse")


def objectives(config: str, model: str) -> dict:
    """The loss terms of `config` for `model`, read from the packaged recipes."""
    from evl.recipes import load_recipe, objectives_of

    if config == "dense":
        return objectives_of(load_recipe("pretrain-tiny"))
    spec = dict(objectives_of(load_recipe(RECIPE.get(model, "smaug-tiny"))))
    if config == "mask":
        spec.pop("sparsify")
    return spec


# ------------------------------------------------------------------------------------------ throughput


def one_row(model: str, config: str, steps: int) -> dict:
    """One configuration in this process (called in a child process by `throughput`)."""
    sys.path.insert(0, str(HERE))
    from train_step import bench_model

    with tempfile.TemporaryDirectory() as tmp:
        row = bench_model(model, objectives(config, model), steps, Path(tmp), progress=1.0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"model": model, "config": config, "batch": row["batch"], "precision": row["precision"],
            "clips_per_s": row["clips_per_s"], "step_s": row["step_s"], "seconds": row["seconds"],
            "gflop_per_clip": round(row["gflop_per_step"] / row["batch"], 2), "peak_mem_mb": round(peak_mb)}


PARTS = {"video tower": ("model.video",), "text tower": ("model.text",),
         "fusion + heads": ("model.fusion", "model.vtm_head", "model.mlm_head", "model.video_proj", "model.text_proj"),
         "MAE decoder": ("terms.mae.decoder",), "frame selector": ("terms.sparsify.selector",)}


def flop_profile(model: str, config: str) -> dict:
    """Where a training step's forward FLOPs go, by part of the objective, in % (the backward pass of each
    op costs about twice its forward, so the shares of the whole step are about the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    from evl.config import from_dict, load_yaml
    from evl.data.datasets import Collator
    from evl.data.text import tokenizer_for
    from evl.models.model import ModelConfig, VideoLanguageModel
    from evl.train.objective import TrainObjective

    sys.path.insert(0, str(HERE))
    from train_step import BATCH, _clips

    torch.manual_seed(0)
    net = VideoLanguageModel(from_dict(ModelConfig, load_yaml(model, "models"), where=model))
    tok = tokenizer_for(net.cfg)
    objective = TrainObjective.from_spec(net, objectives(config, model), tok).train()
    with tempfile.TemporaryDirectory() as tmp:
        data = _clips(net.cfg, BATCH[model], Path(tmp))
        batch = Collator(tok, 32, transforms=objective.batch_transforms())([data[i % len(data)]
                                                                              for i in range(BATCH[model])])
    batch["train_progress"] = 1.0
    with FlopCounterMode(display=False) as counter:   # forward only: backward ops follow no module stack
        objective(batch)["loss"]
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counts.pop("Global", sum(counts.values()))
    root = type(objective).__name__ + "."
    # FlopCounterMode adds an op's FLOPs to every module on the call stack (a tower run inside the loss
    # term that asked for it first counts for that term too), so a part sums its outermost modules by
    # name: those whose name-parent is not itself a counted module of the part
    share = {}
    for part, prefixes in PARTS.items():
        mine = [k.removeprefix(root) for k in counts
                if any(k.removeprefix(root) == x or k.removeprefix(root).startswith(x + ".") for x in prefixes)]
        outer = [k for k in mine if not any(k.startswith(m + ".") for m in mine)]
        share[part] = sum(counts[root + k] for k in outer)
    share["other (losses)"] = total - sum(share.values())
    return {part: round(100 * v / total, 1) for part, v in share.items() if v}


def throughput(models: list[str], steps: int) -> list[dict]:
    rows = []
    for model in models:
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--one", model, config, "--steps", str(steps)],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{model}/{config} failed:\n{out.stderr[-4000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        dense = next(r for r in rows if r["model"] == model and r["config"] == "dense")
        for r in rows:
            if r["model"] == model:
                r["speedup"] = round(r["clips_per_s"] / dense["clips_per_s"], 2)
                r["flop_ratio"] = round(dense["gflop_per_clip"] / r["gflop_per_clip"], 2)
    return rows


# ------------------------------------------------------------------------------------------ downstream


def _recipe(name: str, data: Path, out: Path, files: tuple[str, str], extra: list[str]):
    from evl.recipes import load_recipe

    ann = data / "annotations"
    return load_recipe(name, [f"data.train={ann / files[0]}", f"data.test={ann / files[1]}",
                              f"data.videos={data / 'videos'}", f"train.out_dir={out}", "train.ckpt_every=0",
                              *extra])


def pretrain_and_evaluate(config: str, seed: int, steps: int, qa_steps: int, data: Path, out: Path) -> dict:
    """One row; its result is kept in `out/result.json`, and a later call with the same settings reuses it
    (a benchmark restarted with the same --work resumes where it stopped)."""
    cache = out / "result.json"
    key = {"config": config, "seed": seed, "steps": steps, "qa_steps": qa_steps}
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if {k: kept.get(k) for k in key} == key:
            print(f"reusing {cache}", flush=True)
            return kept
    row = _pretrain_and_evaluate(config, seed, steps, qa_steps, data, out)
    cache.write_text(json.dumps({**row, **key}))
    return row


def _pretrain_and_evaluate(config: str, seed: int, steps: int, qa_steps: int, data: Path, out: Path) -> dict:
    from evl.data.annotations import read_annotations
    from evl.data.answers import AnswerVocab
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.recipes import evaluate_checkpoint_model, run_recipe
    from evl.tasks.evaluate import EvalSettings

    spec = json.dumps(objectives(config, "tiny"))
    pre = run_recipe(_recipe("pretrain-tiny", data, out / "pre", ("pretrain.json", "retrieval_val.json"),
                             [f"objectives={spec}", f"train.max_steps={steps}", f"train.seed={seed}"]),
                     evaluate=False)
    ann, videos = data / "annotations", data / "videos"
    model = VideoLanguageModel.from_pretrained(pre["checkpoint"])
    tok = tokenizer_for(model.cfg, pre["checkpoint"])
    settings = EvalSettings(batch_size=32, rerank_k=16)
    ret = evaluate_checkpoint_model(model, "retrieval", ann / "retrieval_test.json", videos, tok, settings)
    qa = run_recipe(_recipe("qa-tiny", data, out / "qa", ("qa_train.json", "qa_test.json"),
                            [f"train.max_steps={qa_steps}", f"train.seed={seed}"]),
                    init=pre["checkpoint"], evaluate=False)
    qa_model = VideoLanguageModel.from_pretrained(qa["checkpoint"])
    vocab = AnswerVocab.from_json((Path(qa["checkpoint"]) / "answers.json").read_text())
    qa_metrics = evaluate_checkpoint_model(qa_model, "qa", ann / "qa_test.json", videos, tok, settings, vocab=vocab,
                                           train_records=read_annotations(ann / "qa_train.json"))
    return {"config": config, "seed": seed, "steps": pre["steps"], "train_time_s": round(pre["train_time_s"], 1),
            "s_per_step": round(pre["train_time_s"] / pre["steps"], 3), "t2v_r1": ret["t2v_r1"],
            "rerank_t2v_r1": ret.get("rerank_t2v_r1"), "chance_r1": ret["chance_r1"],
            "qa_accuracy": qa_metrics["accuracy"], "qa_baseline": qa_metrics.get("baseline"),
            "final_losses": pre["final_losses"]}


def downstream(seeds: list[int], steps: int, qa_steps: int, clips: int, work: Path,
               step_s: dict[str, float] | None = None) -> list[dict]:
    """Same-steps rows, then dense-wall-clock rows. The wall-clock budget of a configuration is
    `steps` × (dense step time ÷ its step time), from `step_s` — part 1's step times, each measured in
    a process of its own — when given, so a busy machine during part 2 cannot bias it; otherwise from
    the part-2 runs' own times."""
    from evl.data.synthetic import write_synthvl

    data = work / "synthvl"
    if not (data / "annotations" / "pretrain.json").is_file():
        write_synthvl(data, clips=clips, seed=0, frames=16, size=64)
    rows = []
    for seed in seeds:
        same_steps = {}
        for config in CONFIGS:
            r = pretrain_and_evaluate(config, seed, steps, qa_steps, data, work / f"s{seed}-{config}")
            same_steps[config] = r
            rows.append({**r, "budget": "same steps"})
            print(json.dumps(rows[-1]), flush=True)
        times = step_s or {c: same_steps[c]["s_per_step"] for c in CONFIGS}
        for config in CONFIGS[1:]:
            n = max(1, round(steps * times["dense"] / times[config]))
            r = pretrain_and_evaluate(config, seed, n, qa_steps, data, work / f"s{seed}-{config}-wall{n}")
            rows.append({**r, "budget": "dense wall-clock",
                         "budget_from": "part 1 step times" if step_s else "part 2 run times"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def print_tables(rows: list[dict], down: list[dict]) -> None:
    if rows:
        head = (f"{'model':6s} {'config':12s} {'batch':>5s} {'clips/s':>8s} {'speed-up':>8s} {'step s':>7s} "
                f"{'GFLOP/clip':>10s} {'FLOP ÷':>7s} {'peak MB':>8s}")
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['model']:6s} {r['config']:12s} {r['batch']:5d} {r['clips_per_s']:8.2f} {r['speedup']:7.2f}× "
                  f"{r['step_s']:7.3f} {r['gflop_per_clip']:10.2f} {r['flop_ratio']:6.2f}× {r['peak_mem_mb']:8d}")
        print("\nwhere a step's forward FLOPs go (%):")
        for r in rows:
            parts = ", ".join(f"{k} {v}" for k, v in r.get("flop_share_pct", {}).items())
            print(f"  {r['model']:6s} {r['config']:12s} {parts}")
    if down:
        print()
        head = f"{'config':12s} {'budget':17s} {'steps':>9s} {'pretrain s':>11s} {'T2V R@1':>12s} {'QA acc':>12s}"
        print(head)
        print("-" * len(head))
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in down:
            groups.setdefault((r["config"], r["budget"]), []).append(r)
        for (config, budget), rs in groups.items():
            steps = "/".join(str(r["steps"]) for r in rs)
            print(f"{config:12s} {budget:17s} {steps:>9s} {_mean_spread([r['train_time_s'] for r in rs]):>11s} "
                  f"{_mean_spread([r['t2v_r1'] for r in rs]):>12s} {_mean_spread([r['qa_accuracy'] for r in rs]):>12s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per throughput row")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--qa-steps", type=int, default=150)
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-downstream", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps({**one_row(args.one[0], args.one[1], args.steps),
                          "flop_share_pct": flop_profile(args.one[0], args.one[1])}))
        return
    from evl.precision import cpu_info

    t0 = time.perf_counter()
    rows = [] if args.skip_throughput else throughput(args.models, args.steps)
    down: list[dict] = []
    if not args.skip_downstream:
        step_s = {r["config"]: r["step_s"] for r in rows if r["model"] == "tiny"} or None
        with tempfile.TemporaryDirectory() as tmp:
            down = downstream(args.seeds, args.pretrain_steps, args.qa_steps, args.clips, args.work or Path(tmp),
                              step_s if step_s and len(step_s) == len(CONFIGS) else None)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.skip_throughput and previous.get("throughput"):
        rows = previous["throughput"]
        print("throughput skipped: keeping the rows of the previous run in", args.json)
    if args.skip_downstream and previous.get("downstream"):
        down = previous["downstream"]
        print("downstream skipped: keeping the rows of the previous run in", args.json)
    info = cpu_info()
    print(f"\nCPU: {info['model']} ({info['capability']}, bf16 flags {info['flags_bf16']}, {info['cores']} cores), "
          f"torch {info['torch']}; CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print_tables(rows, down)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": info, "throughput": rows, "downstream": down,
                                     "settings": {k: v for k, v in vars(args).items() if k not in ("json", "one", "work")},
                                     "wall_s": round(time.perf_counter() - t0, 1)}, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
