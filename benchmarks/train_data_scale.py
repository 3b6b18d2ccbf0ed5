"""Same pre-training compute, more distinct training clips: does the quickstart's recipe gain from a larger
train split? (issue 21: the quickstart trains 471 steps × 32 samples on 350 clips, i.e. each clip ~43 times.)

One SynthVL draw (seed 0): TRAIN_MAX train / 50 val / 1,000 test clips (half of the test clips with held-out
colour×shape×verb triples). A condition with n training clips keeps the first n training clips of that draw
(every annotation file of the train split filtered to them; val and test files whole), so every condition is
evaluated on the same 1,000 test clips. Each condition trains the quickstart's pre-training recipe
(`pretrain-tiny-lit`, its packaged 471 steps: the step count, hence the compute, is the same for every n)
with ≥ 3 seeds and is evaluated zero-shot (every test caption against the 1,000 test clips);
`--finetune` adds the quickstart's fine-tuning (retrieval 70 steps, QA 150 steps, on the same n clips) and
its fine-tuned R@1, QA and 5-way MC on the test split.

    python benchmarks/train_data_scale.py [--train-clips 350 1400] [--seeds 0 1 2] [--finetune]
        [--steps 471] [--cache-mb 0]

`--steps` / `--cache-mb` (`data.frame_cache_mb`) name another condition: e.g. more steps with the frame
cache on, in the wall-clock the uncached 471 steps took (the `train_s` column says whether it held).
`--override KEY=VALUE ...` (recipe overrides, e.g. `model.video.conv_stem=32`) names one more: such a
condition is also paired against the same clips/steps/cache without the overrides.

Rows are cached in WORK/rows.jsonl (a killed run resumes); after every row the summary is rewritten to
benchmarks/results/train_data_scale.json: mean and 95% bootstrap interval (seeds, then captions) of
zero-shot R@1, and each condition minus the smallest one, paired by seed and caption. Precision: whatever
`auto` gives unless EVL_PRECISION is set (recorded in the meta).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from efficiency_sweep import bootstrap, finetune, paired, recipe, zero_shot  # noqa: E402

RESULTS = HERE / "results" / "train_data_scale.json"
TRAIN_MAX, VAL, TEST = 1400, 50, 1000
CANDIDATE = "lit"     # efficiency_sweep's name of the quickstart's recipe (pretrain-tiny-lit)
STEPS = 471           # that recipe's packaged step count


def full_data(work: Path) -> Path:
    from evl.data.synthetic import SynthConfig, write_synthvl

    d = work / "synthvl"
    if not (d / "meta.json").is_file():
        write_synthvl(d, clips=TRAIN_MAX + VAL + TEST, seed=0,
                      cfg=SynthConfig(split_fractions=(TRAIN_MAX, VAL, TEST)), workers=2)
    return d


def subset(full: Path, n: int, work: Path) -> Path:
    """A data folder whose train-split annotation files keep only the first n training clips."""
    d = work / f"data-{n}"
    ann = d / "annotations"
    if (d / "done").is_file():
        return d
    ann.mkdir(parents=True, exist_ok=True)
    src = full / "annotations"
    order: list[str] = []
    for r in json.loads((src / "pretrain.json").read_text()):
        if r["video"] not in order:
            order.append(r["video"])
    if n > len(order):
        raise SystemExit(f"--train-clips {n}: the draw has only {len(order)} training clips")
    keep = set(order[:n])
    for f in sorted(src.glob("*.json")):
        records = json.loads(f.read_text())
        if f.name == "pretrain.json" or f.stem.endswith("_train"):
            records = [r for r in records if r["video"] in keep]
        (ann / f.name).write_text(json.dumps(records))
    videos = d / "videos"
    if not videos.exists():
        videos.symlink_to((full / "videos").resolve(), target_is_directory=True)
    (d / "done").write_text("")
    return d


def condition(r: dict) -> tuple[int, int, float, str]:
    return (r["train_clips"], r.get("steps_asked", STEPS), r.get("cache_mb", 0), " ".join(r.get("overrides", [])))


def summarise(rows: list[dict]) -> dict:
    runs = [r for r in rows if r["kind"] == "run"]
    conds = sorted({condition(r) for r in runs})
    hits = {c: {r["seed"]: (np.array(r["ranks"]) == 1).astype(float) for r in runs if condition(r) == c}
            for c in conds}
    base = (min(c[0] for c in conds), STEPS, 0, "") if conds else None
    out = []
    for c in conds:
        mine = [r for r in runs if condition(r) == c]
        e = {"train_clips": c[0], "steps": c[1], "cache_mb": c[2], **({"overrides": c[3].split()} if c[3] else {}),
             "seeds": sorted(hits[c]),
             "zs_r1": round(100 * float(np.mean([h.mean() for h in hits[c].values()])), 1),
             "zs_r1_ci95": list(bootstrap(hits[c])),
             "zs_r10": round(float(np.mean([100 * np.mean(np.array(r["ranks"]) <= 10) for r in mine])), 1),
             "train_s": [r["train_s"] for r in mine]}
        if c != base and base in hits:
            e["minus_base"] = {"base": {"train_clips": base[0], "steps": base[1], "cache_mb": base[2]},
                               **paired(hits[c], hits[base])}
        plain = [p for p in conds if p[3] == "" and p[0] == c[0] and p[2] == c[2]]
        if c[3] and plain:   # the same clips and cache without the overrides (the most steps: the equal-minutes base)
            ref = max(plain, key=lambda p: p[1])
            e["minus_without_overrides"] = {"steps": ref[1], **paired(hits[c], hits[ref])}
        ft = [r for r in rows if r["kind"] == "finetune" and condition(r) == c]
        if ft:
            for key in ("ft_t2v_r1", "qa", "mc"):
                vals = [r[key] for r in ft]
                e[key] = {"mean": round(float(np.mean(vals)), 1), "per_seed": {r["seed"]: round(r[key], 1) for r in ft},
                          "sd": round(float(np.std(vals, ddof=1)), 1) if len(vals) > 1 else None}
            e["qa_per_type_majority"] = round(float(np.mean([r["qa_per_type_majority"] for r in ft])), 1)
        out.append(e)
    return {"summary": out}


def markdown(summary: list[dict]) -> str:
    def ft(e: dict, key: str) -> str:
        if key not in e:
            return "—"
        v = e[key]
        return f"{v['mean']:.1f} (sd {v['sd']:.1f})" if v.get("sd") is not None else f"{v['mean']:.1f}"

    def diff(d: dict | None) -> str:
        return (f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" + (f" ({d['steps']})" if "steps" in d else "")
                if d else "—")

    extra = any("overrides" in e for e in summary)
    lines = ["| train clips | steps | frame cache | " + ("overrides | " if extra else "") + "train s (per seed) "
             "| zero-shot R@1 [95% CI] | − 350 clips / 471 steps, paired | " + ("− no overrides (same clips, cache; steps), paired | " if extra else "")
             + "R@10 | fine-tuned R@1 | QA | MC (chance 20) | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|---|" if extra else "")]
    for e in summary:
        cache = f"{e['cache_mb']:g} MB" if e["cache_mb"] else "off"
        over = (f"{' '.join(e.get('overrides', [])) or '—'} | " if extra else "")
        lines.append(f"| {e['train_clips']} | {e['steps']} | {cache} | {over}{' / '.join(f'{t:.0f}' for t in e['train_s'])} "
                     f"| {e['zs_r1']:.1f} [{e['zs_r1_ci95'][0]:.1f}, {e['zs_r1_ci95'][1]:.1f}] | {diff(e.get('minus_base'))} | "
                     + (f"{diff(e.get('minus_without_overrides'))} | " if extra else "")
                     + f"{e['zs_r10']:.1f} | {ft(e, 'ft_t2v_r1')} | {ft(e, 'qa')} | {ft(e, 'mc')} | {len(e['seeds'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-clips", nargs="+", type=int, default=[350, 1400])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/train_data_scale"))
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--cache-mb", type=float, default=0)
    ap.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides of this condition")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the docs' table from --json and stop")
    ap.add_argument("--rewrite", action="store_true", help="write --json from WORK/rows.jsonl (rows gathered by "
                    "separate runs) without training")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.json.read_text())["summary"]))
        return
    from _meta import finish_meta, run_meta

    from evl.precision import resolve_precision
    from evl.recipes import run_recipe

    meta = run_meta(seeds=args.seeds, precision=resolve_precision("auto", "cpu").name)
    meta["evl_precision_env"] = os.environ.get("EVL_PRECISION")
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "rows.jsonl"
    rows = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()] if cache.is_file() else []
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    metas = previous.get("meta_runs", [])

    def done(kind: str, seed: int, cond: tuple) -> bool:
        return any(r["kind"] == kind and r["seed"] == seed and condition(r) == cond for r in rows)

    def write() -> None:
        out = {"settings": {"train_max": TRAIN_MAX, "val": VAL, "test": TEST, "recipe": "pretrain-tiny-lit",
                            "steps": STEPS, "synthvl_seed": 0},
               "meta_runs": [*metas, finish_meta(dict(meta))], **summarise(rows),
               "rows": [{k: v for k, v in r.items() if k not in ("ranks", "compositional")} for r in rows]}
        args.json.write_text(json.dumps(out, indent=1) + "\n")

    def add(row: dict) -> None:
        rows.append(row)
        with cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write()
        print(json.dumps({k: v for k, v in row.items() if k not in ("ranks", "compositional")}), flush=True)

    if args.rewrite:
        write()
        return

    full = full_data(args.work)
    for seed in args.seeds:
        for n in args.train_clips:
            data = subset(full, n, args.work)
            cond = (n, args.steps, args.cache_mb, " ".join(args.override))
            tag = f"n{n}-s{seed}" if cond[1:3] == (STEPS, 0) else f"n{n}-t{args.steps}-c{args.cache_mb:g}-s{seed}"
            tag += "".join(f"-{o.replace('=', '_')}" for o in args.override)
            out = args.work / "runs" / tag

            if not done("run", seed, cond):
                t0 = time.perf_counter()
                res = run_recipe(recipe(CANDIDATE, data, out, args.steps, seed,
                                        [f"data.frame_cache_mb={args.cache_mb}", *args.override]),
                                 evaluate=False)
                zs = zero_shot(res["checkpoint"], data)
                add({"kind": "run", "train_clips": n, "steps_asked": args.steps, "cache_mb": args.cache_mb,
                     **({"overrides": args.override} if args.override else {}), "seed": seed, "steps": res["steps"],
                     "train_s": round(res["train_time_s"], 1), "final_losses": res["final_losses"],
                     "wall_s": round(time.perf_counter() - t0, 1),
                     "zs_r1": round(100 * float(np.mean(np.array(zs["ranks"]) == 1)), 2), **zs})
            if args.finetune and not done("finetune", seed, cond):
                ft = finetune(str(out / "final"), data, out / "ft", seed)
                add({"kind": "finetune", "train_clips": n, "steps_asked": args.steps, "cache_mb": args.cache_mb,
                     **({"overrides": args.override} if args.override else {}), "seed": seed, **ft})


if __name__ == "__main__":
    main()
