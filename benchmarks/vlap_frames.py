"""VLAP against all frames, uniform sampling and a SeViLA-style localizer, side by side in one run.

On SynthVL QA (held-out test split; ~40% of its events last 2–4 of 16 frames, what uniform sampling
misses): the frozen towers of the tiny model pre-trained with VTC + VTM + MLM (`--backbone`, or
`pretrain-tiny` trained here), N = 16 candidate frames per clip. Per seed: the all-frames teacher
(`vlap-teacher-tiny`), then for each k, students started from the teacher:

    uniform             k uniformly spaced frames
    sevila              SeViLA-style localizer (scores every frame alone; pseudo-labels from the teacher)
    vlap, no distill    question-aware Frame-Prompter, answer loss only
    vlap                question-aware Frame-Prompter + QFormer-Distiller (λ = 0.01)
    vlap, frames-only   the released code's selector (no question) + distiller

Accuracy overall, on temporal-order and on action questions (mean ± half-range over seeds); then the
latency per question of each seed-0 checkpoint from decoded frames (decoding excluded), median of
repeated runs, batch 1 and batch 32, all models timed interleaved in this one process.

Long clips (`--long`: `evl synth --long`, 48 frames, 3–5 short events with idle time between, event-
targeted and order questions whose answer lives in one or two moments): N = `--candidates` (32), and
`--frame-input tubelet` gives each candidate position the frame and the next one (motion). Rows add
`moment_coverage` (share of event/order questions whose every answer window holds a picked frame) and
`distinct_frame_sets_per_clip`. Rows are cached in WORK/rows.jsonl: a killed run goes on where it stopped.

Usage: python benchmarks/vlap_frames.py [--seeds 0 1] [--ks 2 4] [--teacher-steps 300]
       [--student-steps 200] [--clips 500] [--backbone CKPT] [--work DIR] [--skip-latency]
       python benchmarks/vlap_frames.py --merge A.json B.json --work DIR   (rows of separate runs, e.g. one
       seed per process; then the latency pass on a quiet machine)
Prints a table and writes benchmarks/results/vlap_frames.json.
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vlap_frames.json"
VARIANTS = {
    "uniform": ["model.select=uniform", "teacher=null", "distill=0"],
    "sevila": ["model.select=localizer", "distill=0"],
    "vlap, no distill": ["model.select=prompter", "model.question_aware=true", "teacher=null", "distill=0"],
    "vlap": ["model.select=prompter", "model.question_aware=true", "distill=0.01"],
    "vlap, frames-only": ["model.select=prompter", "model.question_aware=false", "distill=0.01"],
}


def _common(args, data: Path, out: str, steps: int, seed: int) -> list[str]:
    ann = data / "annotations"
    return [f"data.train={ann / 'qa_train.json'}", f"data.test={ann / 'qa_test.json'}",
            f"data.videos={data / 'videos'}", f"train.out_dir={args.work / out}", f"train.max_steps={steps}",
            f"train.seed={seed}", "train.overwrite=true", "train.log_every=50", f"feature_cache={args.work / 'features'}",
            f"model.num_candidates={args.candidates}", f"model.frame_input={args.frame_input}"]


def test_details(checkpoint: str, data: Path, candidates: int) -> dict:
    """Per test question: right or wrong (`hits`, in qa_test.json order, with `types`) and, for long clips,
    which share of the questions with `moments` had every answer window [start, end) — or at least one
    (`_any`) — hold a picked candidate (candidate n shows source frame sample_indices(T, N)[n]), by type."""
    from evl.data.annotations import read_annotations
    from evl.data.datasets import clip_key
    from evl.data.text import tokenizer_for
    from evl.data.video import sample_indices
    from evl.techniques.vlap.evaluate import evaluate_features
    from evl.techniques.vlap.features import extract_features
    from evl.techniques.vlap.frame_qa import FrameQAModel

    records = read_annotations(data / "annotations" / "qa_test.json")
    model = FrameQAModel.from_pretrained(checkpoint)
    feats = extract_features(model, records, str(data / "videos"), Path(checkpoint).parent.parent / "features")
    records = [r for r in records if clip_key(r) in feats.row]   # what evaluate_features answers, in its order
    res = evaluate_features(model, records, feats, tokenizer_for(model.cfg, checkpoint),
                            FrameQAModel.read_vocab(checkpoint), "qa", keep_picks=True)
    out = {"hits": res["correct"], "types": [r.qtype for r in records]}
    if any("moments" in r.meta for r in records):
        source = sample_indices(json.loads((data / "meta.json").read_text())["frames"], candidates, "uniform")
        every: dict[str, list[bool]] = {}
        some: dict[str, list[bool]] = {}
        for r, p in zip(records, res["picks"], strict=True):
            if "moments" in r.meta:
                shown = [source[i] for i in p]
                covered = [any(a <= f < b for f in shown) for a, b in r.meta["moments"]]
                every.setdefault(r.qtype, []).append(all(covered))
                some.setdefault(r.qtype, []).append(any(covered))
        out["moment_coverage"] = {t: round(100.0 * sum(h) / len(h), 1) for t, h in sorted(every.items())}
        out["moment_coverage_any"] = {t: round(100.0 * sum(h) / len(h), 1) for t, h in sorted(some.items())}
    return out


def _row(name: str, k: int, seed: int, summary: dict, args, data: Path) -> dict:
    test = summary["test"]
    return {"method": name, "k": k, "seed": seed, "frame_input": args.frame_input, "candidates": args.candidates,
            "accuracy": test["qa_accuracy"],
            "temporal": test["per_type"].get("temporal"), "action": test["per_type"].get("action"),
            "event": test["per_type"].get("event"), "order": test["per_type"].get("order"),
            "per_type": test["per_type"], "count_per_type": test.get("count_per_type"),
            "distinct_frame_sets_per_clip": test.get("distinct_frame_sets_per_clip"),
            **test_details(summary["checkpoint"], data, args.candidates),
            "train_s": round(summary["train_time_s"], 1),
            "final_losses": summary["final_losses"], "checkpoint": summary["checkpoint"]}


def train_rows(args, data: Path, backbone: str) -> list[dict]:
    from evl.techniques.vlap.train import load_vlap_recipe, train_vlap

    cache = args.work / "rows.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    if args.recount:   # rows cached before per-question hits and the coverage measures were kept
        for r in rows:
            if "hits" not in r and Path(r["checkpoint"]).is_dir():
                r.update(test_details(r["checkpoint"], data, args.candidates))
        cache.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def done(name: str, k: int, seed: int) -> dict | None:
        return next((r for r in rows if (r["method"], r["k"], r["seed"], r.get("frame_input", "frame"),
                                          r.get("candidates", args.candidates))
                     == (name, k, seed, args.frame_input, args.candidates) and Path(r["checkpoint"]).is_dir()), None)

    def keep(row: dict) -> None:
        rows.append(row)
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k_: v for k_, v in row.items() if k_ not in ("per_type", "count_per_type", "hits", "types")}),
              flush=True)

    tag_in = "" if args.frame_input == "frame" else f"-{args.frame_input}"
    for seed in args.seeds:
        teacher = done("all frames", args.candidates, seed)
        if teacher is None:
            summary = train_vlap(load_vlap_recipe("vlap-teacher-tiny", [f"backbone={backbone}", *_common(
                args, data, f"s{seed}-teacher{tag_in}", args.teacher_steps, seed)]))
            keep(teacher := _row("all frames", args.candidates, seed, summary, args, data))
        for k in args.ks:
            for name, extra in VARIANTS.items():
                if (args.methods and name not in args.methods) or done(name, k, seed):
                    continue
                tag = name.replace(", ", "-").replace(" ", "-")
                summary = train_vlap(load_vlap_recipe("vlap-tiny", [
                    f"init={teacher['checkpoint']}", f"teacher={teacher['checkpoint']}", f"model.num_frames={k}",
                    *_common(args, data, f"s{seed}-k{k}-{tag}{tag_in}", args.student_steps, seed), *extra]))
                keep(_row(name, k, seed, summary, args, data))
        _write(args, [r for r in rows if r.get("frame_input", "frame") == args.frame_input], None)
    return [r for r in rows if r.get("frame_input", "frame") == args.frame_input]


def measure_latency(rows: list[dict], data: Path, repeats: int, batch: int) -> dict[str, dict]:
    """Median seconds per question, batch 1 and batched, for the seed-0 checkpoints, interleaved."""
    import torch

    from evl.data.annotations import read_annotations
    from evl.data.datasets import ClipSettings, VideoTextDataset
    from evl.data.text import tokenizer_for
    from evl.techniques.vlap.frame_qa import FrameQAModel

    seed0 = [r for r in rows if r["seed"] == min(r["seed"] for r in rows)]
    models = {(r["method"], r["k"]): FrameQAModel.from_pretrained(r["checkpoint"]) for r in seed0}
    first = next(iter(models.values()))
    records = read_annotations(data / "annotations" / "qa_test.json")[:batch]
    ds = VideoTextDataset(records, data / "videos", ClipSettings(num_frames=first.cfg.num_candidates,
                                                                 size=first.cfg.video.image_size), "question")
    samples = [ds[i] for i in range(len(records))]
    frames = torch.stack([s["frames"] for s in samples])
    mask = torch.stack([s["frame_mask"] for s in samples])
    tok = tokenizer_for(first.cfg, seed0[0]["checkpoint"])([s["text"] for s in samples], max_length=32)
    times: dict[tuple, dict[str, list[float]]] = {key: {"b1": [], "batch": []} for key in models}
    with torch.inference_mode():
        for m in models.values():   # warm-up
            m(frames[:1], mask[:1], tok.input_ids[:1], tok.attention_mask[:1])
        for r in range(repeats):
            for key, m in models.items():
                i = r % len(records)
                t0 = time.perf_counter()
                m(frames[i:i + 1], mask[i:i + 1], tok.input_ids[i:i + 1], tok.attention_mask[i:i + 1])
                times[key]["b1"].append(time.perf_counter() - t0)
            if r % 4 == 0:
                for key, m in models.items():
                    t0 = time.perf_counter()
                    m(frames, mask, tok.input_ids, tok.attention_mask)
                    times[key]["batch"].append((time.perf_counter() - t0) / len(records))
    return {f"{name}|{k}": {"ms_per_question_b1": round(1000 * statistics.median(t["b1"]), 3),
                            f"ms_per_question_b{len(records)}": round(1000 * statistics.median(t["batch"]), 3)}
            for (name, k), t in times.items()}


def baselines(data: Path) -> dict:
    """What answering without the video scores: the most frequent training answer, overall and per type."""
    from evl.data.annotations import read_annotations
    from evl.tasks.qa import majority_baseline

    train = read_annotations(data / "annotations" / "qa_train.json")
    test = read_annotations(data / "annotations" / "qa_test.json")
    out = majority_baseline([r.answer for r in train], [r.answer for r in test], [r.qtype for r in test],
                            [r.qtype for r in train])
    per_type = out["per_type_majority"]
    return {"majority": round(out["accuracy"], 1), "per_type_majority": round(per_type["accuracy"], 1),
            "per_type_majority_by_type": {t: round(v, 1) for t, v in per_type["per_type"].items()}}


def _acc(row: dict, qtype: str | None) -> np.ndarray:
    hits = np.asarray(row["hits"], dtype=float)
    return hits if qtype is None else hits[np.asarray(row["types"]) == qtype]


def summarise(rows: list[dict], boot: int = 2000) -> list[dict]:
    """Per (method, k): accuracy overall and on event / order questions (mean over seeds, 95% bootstrap
    interval over seeds and questions), and the paired difference to uniform-k (same seed, same
    questions). Rows without per-question hits are left out."""
    rng = np.random.default_rng(0)
    rows = [r for r in rows if "hits" in r]
    out = []
    for method, k in dict.fromkeys((r["method"], r["k"]) for r in rows):
        mine = {r["seed"]: r for r in rows if (r["method"], r["k"]) == (method, k)}
        base = {r["seed"]: r for r in rows if (r["method"], r["k"]) == ("uniform", k)}
        entry = {"method": method, "k": k, "seeds": sorted(mine)}
        for qtype in (None, "event", "order", "action", "temporal"):
            name = qtype or "all"
            per_seed = {s: _acc(r, qtype) for s, r in mine.items()}
            if not all(len(a) for a in per_seed.values()):
                continue
            entry[name] = _boot_stat(per_seed, rng, boot)
            paired = sorted(set(mine) & set(base))
            if method != "uniform" and paired:
                entry[f"{name}_minus_uniform"] = _boot_stat({s: per_seed[s] - _acc(base[s], qtype) for s in paired},
                                                            rng, boot)
        out.append(entry)
    return out


def compare_inputs(rows: list[dict], boot: int = 2000) -> list[dict]:
    """tubelet − frame input, paired by (method, k, seed) and question: overall and per question type."""
    rng = np.random.default_rng(0)
    by = {(r["method"], r["k"], r["seed"], r.get("frame_input", "frame")): r for r in rows if "hits" in r}
    out = []
    for method, k in dict.fromkeys((m, k) for m, k, _, _ in by):
        seeds = sorted(s for m, kk, s, fi in by if (m, kk, fi) == (method, k, "tubelet") and (m, kk, s, "frame") in by)
        if not seeds:
            continue
        entry = {"method": method, "k": k, "seeds": seeds}
        for qtype in (None, "event", "order", "action", "temporal"):
            pairs = {s: _acc(by[(method, k, s, "tubelet")], qtype) - _acc(by[(method, k, s, "frame")], qtype) for s in seeds}
            if all(len(a) for a in pairs.values()):
                entry[f"{qtype or 'all'}_tubelet_minus_frame"] = _boot_stat(pairs, rng, boot)
        out.append(entry)
    return out


def _boot_stat(per_seed: dict, rng: np.random.Generator, boot: int) -> dict:
    """Mean (%) over seeds of per-question values, and a 95% bootstrap interval resampling seeds, then
    questions within each drawn seed."""
    seeds = sorted(per_seed)
    means = []
    for _ in range(boot):
        drawn = [per_seed[seeds[int(i)]] for i in rng.integers(0, len(seeds), len(seeds))]
        means.append(np.mean([a[rng.integers(0, len(a), len(a))].mean() for a in drawn]))
    return {"mean": round(100 * float(np.mean([per_seed[s].mean() for s in seeds])), 1),
            "per_seed": {str(s): round(100 * float(per_seed[s].mean()), 1) for s in seeds},
            "ci95": [round(100 * float(np.percentile(means, q)), 1) for q in (2.5, 97.5)]}


def _stat(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def print_table(rows: list[dict], latency: dict | None) -> None:
    long = any(r.get("event") is not None for r in rows)
    extra = [("event", "event"), ("order", "order")] if long else []
    head = (f"{'method':20s} {'k':>3s} {'accuracy':>12s} {'temporal':>12s} {'action':>12s}"
            + "".join(f" {h:>12s}" for h, _ in extra) + (f" {'sets/clip':>9s} {'cov all':>8s} {'cov any':>8s}" if long else "")
            + f" {'ms/q b1':>9s} {'ms/q b32':>9s} {'speed-up':>9s}")
    print("\n" + head + "\n" + "-" * len(head))
    keys = list(dict.fromkeys((r["method"], r["k"]) for r in rows))
    base = next((v for key, v in (latency or {}).items() if key.startswith("all frames|")), {})
    for name, k in keys:
        rs = [r for r in rows if (r["method"], r["k"]) == (name, k)]
        lat = (latency or {}).get(f"{name}|{k}", {})
        b1 = lat.get("ms_per_question_b1")
        bb = next((v for key, v in lat.items() if key.startswith("ms_per_question_b") and key != "ms_per_question_b1"), None)
        base_b1 = base.get("ms_per_question_b1")
        cols = "".join(f" {_stat([r.get(key) for r in rs]):>12s}" for _, key in extra)
        if long:
            cols += (f" {_stat([r.get('distinct_frame_sets_per_clip') for r in rs]):>9s}"
                     f" {_stat([r.get('moment_coverage', {}).get('event') for r in rs]):>8s}"
                     f" {_stat([r.get('moment_coverage_any', {}).get('event') for r in rs]):>8s}")
        print(f"{name:20s} {k:3d} {_stat([r['accuracy'] for r in rs]):>12s} {_stat([r['temporal'] for r in rs]):>12s} "
              f"{_stat([r['action'] for r in rs]):>12s}{cols} {b1 if b1 is not None else '-':>9} {bb if bb is not None else '-':>9} "
              f"{f'{base_b1 / b1:.2f}x' if b1 and base_b1 else '-':>9s}")


def _write(args, rows, latency, complete: bool = False, baselines: dict | None = None) -> None:
    """Write the JSON. Every latency pass is kept: when the previous JSON timed the same checkpoints, its
    passes stay in `latency_passes` beside this one, and `latency_median` is the median over all of them
    (MEASURING.md: report every pass or the median of all, never the better one)."""
    import statistics

    from evl.precision import cpu_info

    sys.path.insert(0, str(HERE))
    from _meta import finish_meta, run_meta

    settings = {k: v for k, v in vars(args).items() if k not in ("json", "work", "_meta")}
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    same = sorted(r.get("checkpoint", "") for r in previous.get("rows", [])) == sorted(r.get("checkpoint", "") for r in rows)
    passes = list(previous.get("latency_passes", [])) if same else []
    if latency:
        passes.append({"meta": finish_meta(getattr(args, "_meta", None) or run_meta(seeds=args.seeds)),
                       "latency": latency})
    median = None
    if passes:
        median = {key: {m: round(statistics.median(p["latency"][key][m] for p in passes if key in p["latency"]), 3)
                        for m in passes[-1]["latency"][key]} for key in passes[-1]["latency"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu_info(), "settings": settings, "summary": summarise(rows),
                                     "rows": rows, "latency": latency,
                                     "latency_passes": passes, "latency_median": median,
                                     "baselines": baselines, "complete": complete}, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=40, help="timed batch-1 questions per model")
    ap.add_argument("--backbone", default=None, help="evl checkpoint whose towers are used (default: train pretrain-tiny)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--skip-latency", action="store_true", help="train and evaluate only")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="rows from earlier runs' JSON files")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(VARIANTS), help="train only these students")
    ap.add_argument("--long", action="store_true", help="long SynthVL clips (evl synth --long, 48 frames)")
    ap.add_argument("--candidates", type=int, default=None, help="N candidate frames (default 16; 32 with --long)")
    ap.add_argument("--frame-input", choices=["frame", "tubelet"], default="frame",
                    help="what a candidate position shows the tower (tubelet: the frame and the next one)")
    ap.add_argument("--backbone-recipe", default="pretrain-tiny", help="pre-training recipe of the backbone")
    ap.add_argument("--recount", action="store_true", help="add per-question hits and coverage to cached rows")
    ap.add_argument("--compare-inputs", action="store_true", help="write tubelet − frame paired differences of the "
                    "rows cached in --work to --json, and stop")
    args = ap.parse_args()
    args.candidates = args.candidates or (32 if args.long else 16)
    if args.compare_inputs:
        if args.work is None or args.json == RESULTS:
            ap.error("--compare-inputs reads WORK/rows.jsonl and writes its own file: give --work and --json")
        rows = [json.loads(line) for line in (args.work / "rows.jsonl").read_text().splitlines()]
        sys.path.insert(0, str(HERE))
        from _meta import finish_meta, run_meta

        result = {"meta": finish_meta(run_meta()), "comparison": compare_inputs(rows)}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        for e in result["comparison"]:
            print(e["method"], e["k"], {k: (v["mean"], v["ci95"]) for k, v in e.items() if k.endswith("_minus_frame")})
        return
    import torch

    sys.path.insert(0, str(HERE))
    from _meta import run_meta

    args._meta = run_meta(seeds=args.seeds)
    if args.threads:
        torch.set_num_threads(args.threads)
    from evl.data.synthetic import long_config, write_synthvl
    from evl.precision import cpu_info
    from evl.recipes import load_recipe, run_recipe

    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        data = args.work / "synthvl"
        if not (data / "annotations" / "qa_train.json").is_file():
            write_synthvl(data, clips=args.clips, seed=0, frames=16, size=64,
                          cfg=long_config(48, 64) if args.long else None)
        backbone = args.backbone
        if backbone is None and not args.merge and (args.work / "backbone" / "final" / "config.json").is_file():
            backbone = str(args.work / "backbone" / "final")
        if backbone is None and not args.merge:
            ann = data / "annotations"
            backbone = run_recipe(load_recipe(args.backbone_recipe, [
                f"data.train={ann / 'pretrain.json'}", f"data.test={ann / 'retrieval_val.json'}",
                f"data.videos={data / 'videos'}", f"train.out_dir={args.work / 'backbone'}",
                f"train.max_steps={args.pretrain_steps}", "train.ckpt_every=0", "train.overwrite=true"]),
                evaluate=False)["checkpoint"]
        if args.merge:   # a later file's row replaces an earlier one of the same method, k and seed
            merged = {(r["method"], r["k"], r["seed"]): r for path in args.merge for r in json.loads(path.read_text())["rows"]}
            rows = sorted(merged.values(), key=lambda r: (r["seed"], r["k"] != 16, r["k"], list(VARIANTS).index(r["method"])
                                                          if r["method"] in VARIANTS else -1))
        else:
            rows = train_rows(args, data, backbone)
        latency = None if args.skip_latency else measure_latency(rows, data, args.repeats, 32)
        floor = baselines(data)
        info = cpu_info()
        print(f"\nCPU: {info['model']} ({info['capability']}, {info['cores']} cores), torch {info['torch']}")
        print_table(rows, latency)
        by_type = floor["per_type_majority_by_type"]
        print(f"no video: majority {floor['majority']}; per-type majority {floor['per_type_majority']} "
              f"(temporal {by_type.get('temporal')}, action {by_type.get('action')})")
        _write(args, rows, latency, complete=True, baselines=floor)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
