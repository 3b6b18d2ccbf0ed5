"""Fusion in the backbone (EgoVLPv2) vs a separate fusion encoder of the same depth, side by side.

Both rows use the same towers, data, recipe (`egovlpv2-tiny`: EgoNCE + MLM + 2·VTM, ×4 learning rate on
cross-modal and head parameters, 4 frames in pre-training, the model's 8 in evaluation) and number of
steps; only `model.fusion.kind` differs (backbone: gated cross-attention in the top 2 layers of both
towers; encoder: 2 cross-modal layers on top of the text tower). Per seed and row, one pre-training run,
then on SynthVL's held-out test split:

* parameters added for fusion, GFLOPs per (clip, caption) pair in dual and in fusion mode;
* text→video R@1 with one query per clip (its first caption) against the 100-clip gallery: the dual
  encoder alone, the dual top-k re-ranked by the fusion matching score (k = 5, 20; by the score alone
  and by dual logit + matching log-odds, EgoVLPv2's ensemble), and every (caption, clip) pair scored by
  the fusion path ("all pairs");
* the cost of each of those over the whole gallery: GFLOPs (counted) and seconds (measured here);
* how well the matching head separates each caption's clip from a random other clip ("easy") and from
  the dual encoder's best wrong clip ("hard"), and the gate values of backbone fusion;
* multiple choice (5-way, dual + fusion ensemble) and open-ended QA accuracy (a QA head on the fused
  output, fine-tuned `--qa-steps` from the pre-trained checkpoint).

Usage: python benchmarks/fusion_compare.py [--seeds 0 1] [--steps 150] [--qa-steps 60] [--clips 500]
       [--kinds backbone encoder] [--work DIR] [--recipe egovlpv2-tiny]
Prints a table and writes benchmarks/results/fusion_compare.json (figures: mean ± half-range over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "fusion_compare.json"
KINDS = {
    "backbone": [],
    # the same depth as the backbone's fused top layers
    "encoder": ["model.fusion.kind=encoder", "model.fusion.num_layers=2", "model.fusion.num_heads=6"],
}
# every parameter of the separate stack is cross-modal: it gets the ×4 the backbone's cross-attention gets
ENCODER_LR_MULTS = {"fusion": 4.0, "*_head": 4.0}
RERANK_KS = (5, 20)


def _data_overrides(data: Path, out: Path, files: tuple[str, str], steps: int, seed: int) -> list[str]:
    ann = data / "annotations"
    return [f"data.train={ann / files[0]}", f"data.test={ann / files[1]}", f"data.videos={data / 'videos'}",
            f"train.out_dir={out}", f"train.max_steps={steps}", f"train.seed={seed}", "train.ckpt_every=0",
            "train.overwrite=true"]


def fusion_params(model) -> int:
    """Parameters that exist only for fusion: the separate stack, or the towers' gated cross-attention."""
    from evl.efficiency import count_parameters

    return count_parameters(model)["fusion"]


def gallery_scores(model, records, videos: Path, tokenizer, batch_size: int = 32) -> dict:
    """Dual similarities and every pair's matching log-odds for one query (first caption) per clip,
    with the time each part took and counted GFLOPs."""
    import torch

    from evl.efficiency import gflops_per_clip
    from evl.tasks.evaluate import EvalSettings, embed_clips, embed_texts

    s = EvalSettings(batch_size=batch_size, rerank_k=0)
    t0 = time.perf_counter()
    gallery = embed_clips(model, records, videos, s, keep_tokens=True)
    captions = [r.captions[0] for r in records]
    text = embed_texts(model, captions, tokenizer, s, keep_tokens=True)
    sim = text.emb @ gallery.emb.T
    dual_s = time.perf_counter() - t0
    nt, nv = sim.shape

    def log_odds(ti: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, ti.numel(), 4 * batch_size):
            lg = model.score_pairs(gallery.features.select(vi[i:i + 4 * batch_size]),
                                   text.select(ti[i:i + 4 * batch_size]))
            out.append((lg[:, 1] - lg[:, 0]).float())
        return torch.cat(out)

    with torch.no_grad():
        seconds = {}
        for k in RERANK_KS:   # timed on its own: what re-ranking the top k really costs
            t0 = time.perf_counter()
            top = sim.topk(min(k, nv), dim=1).indices
            log_odds(torch.arange(nt).repeat_interleave(top.shape[1]), top.reshape(-1))
            seconds[f"rerank{k}"] = dual_s + time.perf_counter() - t0
        t0 = time.perf_counter()
        fused = log_odds(torch.arange(nt).repeat_interleave(nv), torch.arange(nv).repeat(nt)).view(nt, nv)
        seconds["all_pairs"] = dual_s + time.perf_counter() - t0
    seconds["dual"] = dual_s
    g = gflops_per_clip(model, model.cfg.video.num_frames)
    fuse_only = g["gflops_fusion"] - g["gflops_dual"]
    gflops = {"dual": nv * g["gflops_video"] + nt * g["gflops_text"],
              **{f"rerank{k}": nv * g["gflops_video"] + nt * g["gflops_text"] + nt * min(k, nv) * fuse_only
                 for k in RERANK_KS},
              "all_pairs": nv * g["gflops_video"] + nt * g["gflops_text"] + nt * nv * fuse_only}
    return {"sim": sim, "fused": fused, "scale": float(model.logit_scale()), "seconds": seconds,
            "gflops": gflops, "gflops_pair": {"dual": g["gflops_dual"], "fusion": g["gflops_fusion"]}}


def retrieval_rows(sim, fused, scale: float) -> dict:
    """R@1 (query i's clip is gallery item i) of every scoring: dual, re-ranked top-k, all pairs."""
    import torch

    n = sim.shape[0]
    truth = torch.arange(n)

    def r1(scores: torch.Tensor) -> float:   # pessimistic ties: a tie with a wrong clip is a miss
        own = scores[truth, truth]
        return 100.0 * float(((scores >= own[:, None]).sum(1) == 1).float().mean())

    out = {"dual": r1(sim), "all_pairs": r1(fused), "all_pairs_ensemble": r1(fused + scale * sim)}
    for k in RERANK_KS:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        keep = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top, True)
        low = torch.finfo(sim.dtype).min
        out[f"rerank{k}"] = r1(torch.where(keep, fused, low))
        out[f"rerank{k}_ensemble"] = r1(torch.where(keep, fused + scale * sim, low))
    # the matching head on its own: own clip vs a random other clip / vs the dual encoder's best wrong clip
    g = torch.Generator().manual_seed(0)
    easy = (truth + torch.randint(1, n, (n,), generator=g)) % n
    hard = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf")).argmax(1)
    own = fused[truth, truth]
    out["vtm_beats_easy"] = 100.0 * float((own > fused[truth, easy]).float().mean())
    out["vtm_beats_hard"] = 100.0 * float((own > fused[truth, hard]).float().mean())
    return out


def run_one(kind: str, seed: int, args, data: Path, work: Path) -> dict:
    import torch

    from evl.data.annotations import read_annotations
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.recipes import load_recipe, run_recipe
    from evl.tasks.evaluate import EvalSettings, evaluate_mc

    out = work / f"{kind}-s{seed}"
    over = _data_overrides(data, out / "pretrain", ("pretrain.json", "retrieval_test.json"), args.steps, seed)
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe, over + KINDS[kind])
    if kind == "encoder":
        recipe.train.lr_mults = dict(ENCODER_LR_MULTS)
    summary = run_recipe(recipe, evaluate=False)
    pretrain_s = time.perf_counter() - t0
    ckpt = Path(summary["checkpoint"])
    model = VideoLanguageModel.from_pretrained(ckpt).eval()
    tok = tokenizer_for(model.cfg, ckpt)
    ann, videos = data / "annotations", data / "videos"
    row = {"kind": kind, "seed": seed, "pretrain_s": round(pretrain_s, 1), "final_losses": summary["final_losses"],
           "fusion_params": fusion_params(model),
           "total_params": sum(p.numel() for p in model.parameters()),
           "gates": {n: round(float(p.detach()), 4) for n, p in model.named_parameters() if n.endswith(".gate")}}
    with torch.no_grad():
        scores = gallery_scores(model, read_annotations(ann / "retrieval_test.json"), videos, tok)
        row["retrieval"] = retrieval_rows(scores["sim"], scores["fused"], scores["scale"])
        row["gallery_seconds"] = {k: round(v, 3) for k, v in scores["seconds"].items()}
        row["gallery_gflops"] = {k: round(v, 2) for k, v in scores["gflops"].items()}
        row["gflops_pair"] = scores["gflops_pair"]
        row["mc"] = evaluate_mc(model, read_annotations(ann / "mc_test.json"), videos, tok,
                                EvalSettings(batch_size=32))["accuracy"]
    if args.qa_steps:
        qa_over = _data_overrides(data, out / "qa", ("qa_train.json", "qa_test.json"), args.qa_steps, seed)
        qa = run_recipe(load_recipe("qa-tiny", qa_over), init=ckpt)
        row["qa"] = qa["test"]["accuracy"]
    print(json.dumps({k: v for k, v in row.items() if k != "gates"}), flush=True)
    return row


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def summarize(rows: list[dict]) -> dict:
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    out = {}
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]
        metrics = {f"r1_{k}": [r["retrieval"][k] for r in rs] for k in rs[0]["retrieval"]}
        metrics["mc"] = [r["mc"] for r in rs]
        if all("qa" in r for r in rs):
            metrics["qa"] = [r["qa"] for r in rs]
        for part in ("gallery_seconds", "gallery_gflops"):
            for k in rs[0][part]:
                metrics[f"{part}_{k}"] = [r[part][k] for r in rs]
        out[kind] = {m: dict(zip(("mean", "half_range"), _mean_spread(v), strict=True)) for m, v in metrics.items()}
        out[kind]["fusion_params"] = rs[0]["fusion_params"]
        out[kind]["gflops_pair"] = rs[0]["gflops_pair"]
    return out


def format_table(summary: dict) -> str:
    def f(kind: str, key: str) -> str:
        m = summary[kind].get(key)
        return "–" if m is None else f"{m['mean']:.1f} ± {m['half_range']:.1f}"

    cols = ["r1_dual", "r1_rerank5", "r1_rerank20", "r1_rerank20_ensemble", "r1_all_pairs", "r1_all_pairs_ensemble",
            "r1_vtm_beats_easy", "r1_vtm_beats_hard", "mc", "qa"]
    heads = ["R@1 dual", "rerank5", "rerank20", "rerank20 dual+fus", "all pairs", "all pairs dual+fus",
             "VTM>easy %", "VTM>hard %", "MC", "QA"]
    lines = ["| fusion | fusion params (M) | GFLOPs/pair dual / fusion | " + " | ".join(heads) + " |",
             "|" + "---|" * (len(heads) + 3)]
    for kind, s in summary.items():
        g = s["gflops_pair"]
        lines.append(f"| {kind} | {s['fusion_params'] / 1e6:.2f} | {g['dual']:.2f} / {g['fusion']:.2f} | "
                     + " | ".join(f(kind, c) for c in cols) + " |")
    lines += ["", "| fusion | gallery cost | dual | rerank5 | rerank20 | all pairs |", "|---|---|---|---|---|---|"]
    for kind in summary:
        for part, unit in (("gallery_gflops", "GFLOPs"), ("gallery_seconds", "s")):
            lines.append(f"| {kind} | {unit} | " + " | ".join(
                f"{summary[kind][f'{part}_{k}']['mean']:.1f}" for k in ("dual", "rerank5", "rerank20", "all_pairs")) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--qa-steps", type=int, default=60, help="QA fine-tuning steps (0 = no QA column)")
    ap.add_argument("--clips", type=int, default=500)
    ap.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    ap.add_argument("--recipe", default="egovlpv2-tiny")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    from evl.data.synthetic import write_synthvl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _meta import finish_meta, run_meta

    meta = run_meta(seeds=args.seeds)

    work = args.work or Path(tempfile.mkdtemp(prefix="evl-fusion-"))
    data = work / "synthvl"
    if not (data / "annotations" / "pretrain.json").is_file():
        write_synthvl(data, clips=args.clips, seed=0)
    rows = [run_one(kind, seed, args, data, work) for seed in args.seeds for kind in args.kinds]
    summary = summarize(rows)
    table = format_table(summary)
    print(table)
    from evl.precision import cpu_info

    machine = {**cpu_info(), "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": finish_meta(meta), "args": {k: str(v) for k, v in vars(args).items()},
                                    "machine": machine,
                                    "rows": rows, "summary": summary, "table": table}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
