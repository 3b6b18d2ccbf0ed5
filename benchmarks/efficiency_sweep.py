"""Accuracy per unit of training compute: each candidate pre-training recipe trained at fixed wall-clock
budgets (¼, ½, 1, 2× the quickstart's pre-training budget), ≥ 3 seeds, evaluated zero-shot on a SynthVL
test split of 1,000 clips (half of them with held-out colour×shape×verb combinations).

Usage:
    python benchmarks/efficiency_sweep.py [--candidates dense vtc lit lit-full] [--budgets 1 0.5]
        [--seeds 0 1 2] [--work runs/efficiency_sweep] [--finetune]

The budget: B = 150 steps × the dense recipe's median isolated step time on this machine (the quickstart's
pre-training). Each candidate's median step time is measured once (a 16-step probe, steps 4-16); at
budget b it trains round(b·B / its step time) steps with a cosine schedule and 10% warm-up. Every row
records the steps, the measured training wall-clock and the counted training GFLOPs (torch's
FlopCounterMode on a warm step: a locked tower's cache hits count as free, as they are).
`--finetune` adds, for each pre-trained checkpoint at budget 1, the quickstart's fine-tuning (retrieval
70 steps, QA 150 steps) and its test metrics (fine-tuned R@1, QA accuracy, 5-way MC), 1,000 test clips.

Rows are cached in WORK/rows.jsonl: a killed sweep goes on where it stopped (a row is written only when it
is complete). After every row the summary is rewritten: benchmarks/results/efficiency_sweep.json (every row,
the per-query ranks kept as R@1 hits; mean with a 95% bootstrap interval over seeds and test captions; the
paired difference to the dense recipe per seed with its interval) and docs/efficiency_sweep.png (R@1
against training minutes and against training GFLOPs, one line per candidate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "efficiency_sweep.png"   # results/*.png are not committed
REFERENCE_STEPS = 150          # the quickstart's pre-training (pretrain-tiny)
WINNER = "lit"                 # the quickstart's recipe; every other candidate is also compared with it
TRAIN, VAL, TEST = 350, 50, 1000
CANDIDATES = {   # name → (packaged recipe, overrides)
    "dense": ("pretrain-tiny", []),
    "vtc": ("pretrain-tiny-vtc", []),
    "lit": ("pretrain-tiny-lit", []),
    "lit-full": ("pretrain-tiny-lit", ["model.text.locked_layers=2"]),
    "dense-lit": ("pretrain-tiny", ["model.text.locked_layers=1"]),   # ablation: the lock with all three terms
}


def data_dir(work: Path) -> Path:
    from evl.data.synthetic import SynthConfig, write_synthvl

    d = work / "synthvl"
    if not (d / "meta.json").is_file():
        write_synthvl(d, clips=TRAIN + VAL + TEST, seed=0, cfg=SynthConfig(split_fractions=(TRAIN, VAL, TEST)),
                      workers=2)
    return d


def recipe(name: str, data: Path, out: Path, steps: int, seed: int, extra: list[str] | None = None):
    from evl.recipes import load_recipe

    base, overrides = CANDIDATES[name]
    ann = data / "annotations"
    return load_recipe(base, [*overrides, f"data.train={ann / 'pretrain.json'}", f"data.test={ann / 'retrieval_val.json'}",
                              f"data.videos={data / 'videos'}", f"train.out_dir={out}", "train.overwrite=true",
                              f"train.max_steps={steps}", f"train.warmup_steps={max(1, round(0.1 * steps))}",
                              f"train.seed={seed}", "train.ckpt_every=0", "train.log_every=1", *(extra or [])])


def step_times(run_dir: Path, batch: int, skip: int = 3) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [batch / r["clips_per_s"] for r in rows if r.get("step", 0) > skip and r.get("clips_per_s")]


def calibrate(name: str, data: Path, work: Path) -> dict:
    """Median isolated step time of a candidate (a 16-step probe) and its GFLOPs per warm step."""
    from evl.recipes import run_recipe

    out = work / "probe" / name
    cfg = recipe(name, data, out, 16, 0)
    run_recipe(cfg, evaluate=False)
    times = step_times(out, cfg.train.batch_size)
    return {"kind": "probe", "candidate": name, "step_s": round(statistics.median(times), 4),
            "step_s_all": [round(t, 4) for t in times], "gflop_per_step": round(count_gflop(cfg, data), 2)}


def count_gflop(cfg, data: Path) -> float:
    """Training GFLOPs of one warm step (forward + backward) of the recipe's objective on a real batch."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from evl.data.datasets import ClipSettings, Collator, VideoTextDataset
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.recipes import objectives_of
    from evl.train.objective import TrainObjective

    torch.manual_seed(0)
    model = VideoLanguageModel(cfg.model)
    tok = tokenizer_for(model.cfg)
    objective = TrainObjective.from_spec(model, objectives_of(cfg), tok).train()
    clip = ClipSettings(num_frames=model.cfg.video.num_frames, size=model.cfg.video.image_size, train=True)
    ds = VideoTextDataset.from_file(data / "annotations" / "pretrain.json", data / "videos", clip, "caption")
    batch = Collator(tok, cfg.data.max_text_len, transforms=objective.batch_transforms())(
        [ds[i] for i in range(cfg.train.batch_size)])
    batch["train_progress"] = 0.5
    objective(batch)["loss"].backward()    # warm: a locked tower's cache is filled as in training
    objective.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective(batch)["loss"].backward()
    return counter.get_total_flops() / 1e9


def zero_shot(checkpoint: str, data: Path) -> dict:
    """Text→video ranks of every test caption (dual encoder), and which captions are compositional."""
    import torch

    from evl.data.annotations import read_annotations
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.tasks.evaluate import EvalSettings, clip_key, embed_clips, embed_texts
    from evl.tasks.retrieval import text_to_video_ranks

    model = VideoLanguageModel.from_pretrained(checkpoint).eval()
    tok = tokenizer_for(model.cfg, checkpoint)
    records = read_annotations(data / "annotations" / "retrieval_test.json")
    s = EvalSettings(batch_size=32, rerank_k=0, device="cpu")
    with torch.no_grad():
        gallery = embed_clips(model, records, data / "videos", s)
        index = {k: i for i, k in enumerate(gallery.keys)}
        captions, t2v, comp = [], [], []
        for r in records:
            for c in r.captions:
                captions.append(c)
                t2v.append(index[clip_key(r)])
                comp.append(bool(r.meta.get("compositional")))
        text = embed_texts(model, captions, tok, s)
    ranks = text_to_video_ranks(text.emb.float(), gallery.emb.float(), torch.tensor(t2v), ties="pessimistic")
    return {"ranks": ranks.tolist(), "compositional": comp, "videos": len(gallery.keys)}


def finetune(pre_ckpt: str, data: Path, out: Path, seed: int) -> dict:
    """The quickstart's fine-tuning from `pre_ckpt`, then fine-tuned retrieval R@1, QA and MC on the test split."""
    from evl.data.annotations import read_annotations
    from evl.data.answers import AnswerVocab
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.quickstart import _recipe
    from evl.recipes import evaluate_checkpoint_model, run_recipe
    from evl.tasks.evaluate import EvalSettings

    seed_o = [f"train.seed={seed}"]
    ret = run_recipe(_recipe("retrieval-tiny", data, out / "retrieval", ("retrieval_train.json", "retrieval_test.json"),
                             None, seed_o), init=pre_ckpt, evaluate=False)
    qa = run_recipe(_recipe("qa-tiny", data, out / "qa", ("qa_train.json", "qa_test.json"), None, seed_o),
                    init=pre_ckpt, evaluate=False)
    ann, videos = data / "annotations", data / "videos"
    s = EvalSettings(batch_size=32, rerank_k=0)
    m = VideoLanguageModel.from_pretrained(ret["checkpoint"])
    tok = tokenizer_for(m.cfg, ret["checkpoint"])
    r = evaluate_checkpoint_model(m, "retrieval", ann / "retrieval_test.json", videos, tok, s)
    mc = evaluate_checkpoint_model(m, "mc", ann / "mc_test.json", videos, tok, s)
    qm = VideoLanguageModel.from_pretrained(qa["checkpoint"])
    vocab = AnswerVocab.from_json((Path(qa["checkpoint"]) / "answers.json").read_text())
    q = evaluate_checkpoint_model(qm, "qa", ann / "qa_test.json", videos, tok, s, vocab=vocab,
                                  train_records=read_annotations(ann / "qa_train.json"))
    return {"ft_t2v_r1": r["t2v_r1"], "qa": q["accuracy"], "qa_per_type_majority": q["baseline"]["per_type_majority"]["accuracy"],
            "mc": mc["accuracy"], "ft_train_s": round(ret["train_time_s"] + qa["train_time_s"], 1)}


# ------------------------------------------------------------------------------------------ statistics


def bootstrap(hits: dict[int, np.ndarray], n: int = 2000, rng_seed: int = 0) -> tuple[float, float]:
    """95% interval of mean R@1 (%) resampling seeds, then test captions within each drawn seed."""
    rng = np.random.default_rng(rng_seed)
    seeds = sorted(hits)
    means = []
    for _ in range(n):
        drawn = rng.choice(seeds, size=len(seeds), replace=True)
        means.append(np.mean([hits[s][rng.integers(0, len(hits[s]), len(hits[s]))].mean() for s in drawn]))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return round(100 * float(lo), 1), round(100 * float(hi), 1)


def paired(a: dict[int, np.ndarray], b: dict[int, np.ndarray], n: int = 2000, rng_seed: int = 0) -> dict:
    """Candidate minus dense, per seed (same seed, same captions), mean with a 95% bootstrap interval
    resampling seeds and captions (the same caption draw for both, so the pairing is kept)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {}
    per_seed = {s: round(100 * float(a[s].mean() - b[s].mean()), 1) for s in seeds}
    rng = np.random.default_rng(rng_seed)
    diffs = []
    for _ in range(n):
        drawn = rng.choice(seeds, size=len(seeds), replace=True)
        d = []
        for s in drawn:
            idx = rng.integers(0, len(a[s]), len(a[s]))
            d.append(a[s][idx].mean() - b[s][idx].mean())
        diffs.append(np.mean(d))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"per_seed": per_seed, "mean": round(float(np.mean(list(per_seed.values()))), 1),
            "ci95": [round(100 * float(lo), 1), round(100 * float(hi), 1)]}


def summarise(rows: list[dict]) -> list[dict]:
    runs = [r for r in rows if r["kind"] == "run"]
    hits = {}
    for r in runs:
        ranks = np.array(r["ranks"])
        comp = np.array(r["compositional"])
        hits.setdefault((r["candidate"], r["budget"]), {})[r["seed"]] = {
            "all": (ranks == 1).astype(float), "held_out": (ranks[comp] == 1).astype(float),
            "r10_all": (ranks <= 10).astype(float)}
    out = []
    for (cand, budget), by_seed in sorted(hits.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = [r for r in runs if r["candidate"] == cand and r["budget"] == budget]
        entry = {"candidate": cand, "recipe": " ".join([CANDIDATES[cand][0], *CANDIDATES[cand][1]]), "budget": budget,
                 "seeds": sorted(by_seed), "steps": rs[0]["steps"],
                 "train_min": round(statistics.mean(r["train_s"] for r in rs) / 60, 2),
                 "train_gflop": round(statistics.mean(r["train_gflop"] for r in rs), 0)}
        for part in ("all", "held_out", "r10_all"):
            key = "zs_r10_all" if part == "r10_all" else f"zs_r1_{part}"
            h = {s: v[part] for s, v in by_seed.items()}
            entry[key] = round(100 * float(np.mean([v.mean() for v in h.values()])), 1)
            entry[f"{key}_per_seed"] = {s: round(100 * float(v.mean()), 1) for s, v in sorted(h.items())}
            entry[f"{key}_ci95"] = bootstrap(h)
            for other in ("dense", WINNER):
                ref = hits.get((other, budget))
                if cand != other and ref:
                    entry[f"{key}_minus_{other}"] = paired(h, {s: v[part] for s, v in ref.items()})
        fts = [r for r in rows if r["kind"] == "finetune" and r["candidate"] == cand and r["budget"] == budget]
        if fts:
            for key in ("ft_t2v_r1", "qa", "mc"):
                vals = [f[key] for f in fts]
                entry[key] = round(statistics.mean(vals), 1)
                entry[f"{key}_per_seed"] = {f["seed"]: f[key] for f in fts}
        out.append(entry)
    return out


def plot(summary: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cand in sorted({s["candidate"] for s in summary}):
        pts = sorted((s for s in summary if s["candidate"] == cand), key=lambda s: s["budget"])
        for ax, key in zip(axes, ("train_min", "train_gflop"), strict=True):
            x = [p[key] for p in pts]
            y = [p["zs_r1_all"] for p in pts]
            err = [[p["zs_r1_all"] - p["zs_r1_all_ci95"][0] for p in pts], [p["zs_r1_all_ci95"][1] - p["zs_r1_all"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=cand)
    axes[0].set_xlabel("pre-training minutes (this CPU)")
    axes[1].set_xlabel("pre-training GFLOPs (counted)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("zero-shot text→video R@1 (%), 1,000 test clips")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[dict], metas: list[dict], budget_s: float | None, dest: Path, png: Path) -> None:
    summary = summarise(rows)
    out = {"meta": metas[-1], "meta_runs": metas, "protocol": {
        "data": f"SynthVL seed 0, {TRAIN} train / {VAL} val / {TEST} test clips (half of the test clips "
                "with held-out colour×shape×verb triples), 64×64, 16 frames",
        "budget_s_at_1": budget_s, "reference": f"pretrain-tiny, {REFERENCE_STEPS} steps",
        "eval": "zero-shot text→video R@1 and R@10 of the dual encoder on every test caption against all "
                f"{TEST} test videos (pessimistic ties); held_out = the captions of clips with held-out triples",
        "interval": "95% bootstrap over seeds and test captions (2,000 draws)",
        "paired": f"candidate minus dense (and minus {WINNER}) with the same seed on the same captions"},
        "summary": summary,
        "rows": [{k: v for k, v in r.items() if k not in ("ranks", "compositional")} for r in rows]}
    dest.write_text(json.dumps(out, indent=1))
    plot(summary, png)


def markdown(summary: list[dict]) -> str:
    """The README's table: one row per (budget, candidate)."""
    def ci(e, key):
        lo, hi = e[f"{key}_ci95"]
        return f"{e[key]:.1f} [{lo:.1f}, {hi:.1f}]"

    def diff(e, key, other="dense"):
        d = e.get(f"{key}_minus_{other}")
        return f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d else "—"

    lines = ["| budget | candidate | steps | train min | train TFLOP | zero-shot R@1 [95% CI] | − dense, paired | "
             f"− {WINNER}, paired | held-out half R@1 | − dense, paired | R@10 | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(summary, key=lambda e: (e["budget"], e["candidate"] != "dense", -e["zs_r1_all"])):
        lines.append(f"| {e['budget']:g}× | {e['candidate']} | {e['steps']} | {e['train_min']:.1f} | "
                     f"{e['train_gflop'] / 1000:.1f} | {ci(e, 'zs_r1_all')} | {diff(e, 'zs_r1_all')} | "
                     f"{diff(e, 'zs_r1_all', WINNER)} | {ci(e, 'zs_r1_held_out')} | {diff(e, 'zs_r1_held_out')} | "
                     f"{ci(e, 'zs_r10_all')} | {len(e['seeds'])} |")
    fts = [e for e in summary if "qa" in e]
    if fts:
        lines += ["", "| budget | candidate | fine-tuned R@1 | QA | MC (5-way) | seeds |", "|---|---|---|---|---|---|"]
        for e in fts:
            lines.append(f"| {e['budget']:g}× | {e['candidate']} | {e['ft_t2v_r1']:.1f} | {e['qa']:.1f} | {e['mc']:.1f} | "
                         f"{len(e['qa_per_seed'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", nargs="+", default=["dense", "vtc", "lit", "lit-full"], choices=list(CANDIDATES))
    ap.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5, 0.25, 2.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/efficiency_sweep"))
    ap.add_argument("--finetune", action="store_true", help="also fine-tune and evaluate QA/MC at budget 1")
    ap.add_argument("--json", type=Path, default=RESULTS / "efficiency_sweep.json")
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--table", action="store_true", help="print the README's table from --json and stop")
    ap.add_argument("--summarise-only", action="store_true", help="rewrite --json and the plot from WORK/rows.jsonl")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.json.read_text())["summary"]))
        return
    if any(b <= 0 for b in args.budgets):
        ap.error("--budgets must be positive")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=args.seeds)
    args.work.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    # every invocation that added rows keeps its metadata (commit, CPU, load); this one is added last
    earlier_meta = previous.get("meta_runs", [previous["meta"]] if "meta" in previous else [])
    cache = args.work / "rows.jsonl"
    rows = [json.loads(x) for x in cache.read_text().splitlines() if x.strip()] if cache.is_file() else []

    def have(**key) -> dict | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)

    def add(row: dict | None) -> None:
        if row is not None:
            rows.append(row)
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
        probe = have(kind="probe", candidate="dense")
        budget = round(REFERENCE_STEPS * probe["step_s"], 1) if probe else None
        write_outputs(rows, [*earlier_meta, finish_meta(dict(meta))], budget, args.json, args.plot)
        if row is not None:
            print(json.dumps({k: v for k, v in row.items() if k not in ("ranks", "compositional", "step_s_all")}),
                  flush=True)

    if args.summarise_only:
        add(None)
        return
    from evl.recipes import run_recipe

    data = data_dir(args.work)
    probes: dict[str, dict] = {}
    budget_s = None
    for cand in ["dense", *[c for c in args.candidates if c != "dense"]]:
        probes[cand] = have(kind="probe", candidate=cand) or calibrate(cand, data, args.work)
        if not have(kind="probe", candidate=cand):
            add(probes[cand])
    budget_s = round(REFERENCE_STEPS * probes["dense"]["step_s"], 1)
    for budget in args.budgets:
        for seed in args.seeds:
            for cand in args.candidates:
                steps = max(10, round(budget * budget_s / probes[cand]["step_s"]))
                out = args.work / "runs" / f"{cand}-b{budget:g}-s{seed}"
                row = have(kind="run", candidate=cand, budget=budget, seed=seed)
                if row is None:
                    t0 = time.perf_counter()
                    res = run_recipe(recipe(cand, data, out, steps, seed), evaluate=False)
                    zs = zero_shot(res["checkpoint"], data)
                    row = {"kind": "run", "candidate": cand, "budget": budget, "seed": seed, "steps": res["steps"],
                           "train_s": round(res["train_time_s"], 1),
                           "train_gflop": round(res["steps"] * probes[cand]["gflop_per_step"], 0),
                           "final_losses": res["final_losses"], "wall_s": round(time.perf_counter() - t0, 1),
                           "zs_r1": round(100 * float(np.mean(np.array(zs["ranks"]) == 1)), 2), **zs}
                    add(row)
                if args.finetune and budget == 1.0 and not have(kind="finetune", candidate=cand, budget=budget, seed=seed):
                    ft = finetune(str(out / "final"), data, out / "ft", seed)
                    add({"kind": "finetune", "candidate": cand, "budget": budget, "seed": seed, **ft})


if __name__ == "__main__":
    main()
