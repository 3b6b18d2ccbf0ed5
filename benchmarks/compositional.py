"""Do compositional hard negatives make the dual encoder bind attributes, actions and order? (issue 23)

Each candidate pre-trains the tiny model with the quickstart's recipe (`pretrain-tiny-lit`: VTC, text
tower locked below its top layer) for the same number of steps, with and without generated negative
captions (`neg_vtc`, `evl.data.rewrite`), on SynthVL seed 0 (350 train / 50 val / 1,000 test clips),
3 training seeds each, fp32. Every checkpoint is then scored zero-shot with its dual encoder (cosine of
clip and option embeddings; no fine-tuning, no fusion):

* **MC** — SynthVL's 5-way multiple choice on the 1,000 test clips (chance 20%): the true caption
  against 4 captions with one colour, shape or verb changed or the events reordered, and per negative
  kind the pairwise accuracy (true caption scored above that negative; chance 50%);
* **MC, other phrasing** — the same clips' facts written with another template and other verb phrases
  than SynthVL's captions (`ALT_VERBS`; "there is a red circle that gets larger; later, ..."), so a
  gain that only matches SynthVL's grammar would not show here;
* **held-out kind** — `neg-no-order` trains with every rewrite kind but `order`: its pairwise accuracy on
  order negatives tells whether binding learnt from the other kinds carries over;
* **zero-shot text→video R@1** over the 1,000 test clips, to see what the negatives cost retrieval.

`--finetune` then fine-tunes each `lit` and `lit+neg` checkpoint as the quickstart does (`retrieval-tiny`:
VTC + VTM, 70 steps; for `lit+neg` with `neg_vtc` and `neg_vtm` added, so the matching head also sees the
rewriter's confusions) and ranks every test clip's first caption against the 1,000 test clips three
ways: the dual encoder alone, the dual top-16 re-ordered by the fusion match probability (`rerank`), and
by dual logit + match log-odds (`ensemble`); and scores MC with the dual scores and with dual + fusion.

Intervals: 95% bootstrap over seeds and test questions; paired = candidate minus `lit`, same seed, same
questions. Rows (with per-question hits, so the summary can be recomputed from the JSON alone) are cached
in runs/compositional/rows.jsonl (fine-tuning results in finetune.jsonl); a killed run resumes. Results: benchmarks/results/compositional.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency_sweep import bootstrap, data_dir, paired, zero_shot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 236   # pretrain-tiny-lit at half the quickstart's pre-training minutes (efficiency_sweep, 0.5x)
ALL = "[colour,size,noun,verb,swap,order]"
CANDIDATES = {
    "lit": [],
    "lit+neg": ["objectives.neg_vtc.weight=1", f"objectives.neg_vtc.kinds={ALL}", "objectives.neg_vtc.count=2"],
    "lit+neg-no-order": ["objectives.neg_vtc.weight=1", "objectives.neg_vtc.kinds=[colour,size,noun,verb,swap]",
                         "objectives.neg_vtc.count=2"],
    # the video side (video_probe.py: shape is nearly absent at 16-pixel patches): 8-pixel patches, 4x the tokens
    "lit-p8": ["model.video.patch_size=8"],
    "lit+neg-p8": ["model.video.patch_size=8", "objectives.neg_vtc.weight=1", f"objectives.neg_vtc.kinds={ALL}",
                   "objectives.neg_vtc.count=2"],
    # a convolutional stem (two stride-2 3x3 convs per frame) before the same 16-pixel tubelet grid
    "lit-stem": ["model.video.conv_stem=32"],
    "lit+neg-stem": ["model.video.conv_stem=32", "objectives.neg_vtc.weight=1", f"objectives.neg_vtc.kinds={ALL}",
                     "objectives.neg_vtc.count=2"],
}
ALT_VERBS = {"move_left": "is heading towards the left", "move_right": "is heading towards the right",
             "move_up": "is heading upwards", "move_down": "is heading downwards", "grow": "gets larger",
             "shrink": "gets smaller", "rotate": "turns in place", "appear": "comes into view",
             "disappear": "goes out of view", "bounce": "keeps jumping"}


def alt_caption(facts) -> str:
    parts = [f"a {f.colour} {f.shape} that {ALT_VERBS[f.verb]}" for f in facts]
    return "there is " + "; later, there is ".join(parts)


def alt_mc(data: Path) -> list[dict]:
    """The test clips' multiple choice in the other phrasing: true facts vs one fact changed / reordered."""
    from evl.data.synth_text import _perturb, facts_of

    out = []
    for meta in json.loads((data / "annotations" / "clips.json").read_text()):
        if meta["split"] != "test":
            continue
        rng = np.random.default_rng(meta["index"])
        facts = facts_of(meta)
        kinds = ["colour", "shape", "verb"] + (["order", "order"] if len(facts) > 1 else [])
        true, options, types = alt_caption(facts), [], []
        for _ in range(200):
            kind = kinds[int(rng.integers(len(kinds)))]
            changed = _perturb(facts, kind, rng)
            if changed is None or changed == facts:
                continue
            text = alt_caption(changed)
            if text != true and text not in options:
                options.append(text)
                types.append(kind)
            if len(options) == 4:
                break
        answer = int(rng.integers(len(options) + 1))
        options.insert(answer, true)
        types.insert(answer, "positive")
        out.append({"video": meta["video"], "caption": options, "answer": answer, "negative_types": types})
    return out


def score_mc(model, tok, records: list[dict], videos: dict[str, np.ndarray]) -> dict:
    """Per question: correct (argmax of the dual scores) and, per negative, true-above-negative.
    `videos`: clip embedding per video name."""
    import torch

    from evl.tasks.evaluate import EvalSettings, embed_texts

    s = EvalSettings(batch_size=32, rerank_k=0, device="cpu")
    with torch.no_grad():
        texts = embed_texts(model, [o for r in records for o in r["caption"]], tok, s).emb.float().numpy()
    correct, pairwise = [], {}
    row = 0
    for r in records:
        k = len(r["caption"])
        scores = (texts[row:row + k] @ videos[r["video"]]).tolist()
        row += k
        correct.append(int(int(np.argmax(scores)) == r["answer"]))
        for j, t in enumerate(r["negative_types"]):
            if t != "positive":
                pairwise.setdefault(t, []).append(int(scores[r["answer"]] > scores[j]))
    return {"correct": "".join(map(str, correct)), "pairwise": {t: "".join(map(str, v)) for t, v in pairwise.items()}}


def evaluate(checkpoint: str, data: Path) -> dict:
    import torch

    from evl.data.annotations import Record
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.tasks.evaluate import EvalSettings, embed_clips

    model = VideoLanguageModel.from_pretrained(checkpoint).eval()
    tok = tokenizer_for(model.cfg, checkpoint)
    mc = json.loads((data / "annotations" / "mc_test.json").read_text())
    names = sorted({r["video"] for r in mc})
    with torch.no_grad():
        gallery = embed_clips(model, [Record(video=n) for n in names], data / "videos",
                              EvalSettings(batch_size=32, rerank_k=0, device="cpu"))
    assert len(gallery.keys) == len(names), "every test clip decodes"
    videos = dict(zip(names, gallery.emb.float().numpy(), strict=True))
    zs = zero_shot(checkpoint, data)
    return {"mc": score_mc(model, tok, mc, videos), "mc_alt": score_mc(model, tok, alt_mc(data), videos),
            "r1_hits": "".join("1" if r == 1 else "0" for r in zs["ranks"])}


def finetune(pre_ckpt: str, data: Path, out: Path, seed: int, negatives: bool) -> dict:
    """The quickstart's retrieval fine-tuning, then per-query ranks (dual, rerank, ensemble) and MC."""
    import torch

    from evl.data.annotations import Record
    from evl.data.text import tokenizer_for
    from evl.models.model import VideoLanguageModel
    from evl.quickstart import _recipe
    from evl.recipes import run_recipe
    from evl.tasks.evaluate import EvalSettings, embed_clips, embed_texts

    extra = [f"train.seed={seed}", "train.precision=fp32"]
    if negatives:
        extra += ["objectives.neg_vtc.weight=1", f"objectives.neg_vtc.kinds={ALL}", "objectives.neg_vtc.count=2",
                  "objectives.neg_vtm.weight=1", f"objectives.neg_vtm.kinds={ALL}", "objectives.neg_vtm.count=2"]
    res = run_recipe(_recipe("retrieval-tiny", data, out, ("retrieval_train.json", "retrieval_test.json"), None, extra),
                     init=pre_ckpt, evaluate=False)
    model = VideoLanguageModel.from_pretrained(res["checkpoint"]).eval()
    tok = tokenizer_for(model.cfg, res["checkpoint"])
    tests = json.loads((data / "annotations" / "retrieval_test.json").read_text())
    s = EvalSettings(batch_size=32, rerank_k=0, device="cpu")
    k = 16
    with torch.no_grad():
        gallery = embed_clips(model, [Record(video=r["video"]) for r in tests], data / "videos", s, keep_tokens=True)
        assert len(gallery.keys) == len(tests), "every test clip decodes"
        text = embed_texts(model, [r["caption"][0] for r in tests], tok, s, keep_tokens=True)
        scale = float(model.logit_scale())
        dual = scale * text.emb.float() @ gallery.emb.float().T                     # (Q, V), query i ↔ clip i
        top = dual.topk(k, dim=1).indices
        match = torch.empty(len(tests), k)
        for i in range(len(tests)):
            logits = model.score_pairs(gallery.features.select(top[i]), text.select(torch.full((k,), i))).float()
            match[i] = logits[:, 1] - logits[:, 0]
        truth = torch.arange(len(tests))
        ranks = {"dual": (dual >= dual[truth, truth][:, None]).sum(1)}   # pessimistic ties, as efficiency_sweep
        for name, score in (("rerank", match.sigmoid()), ("ensemble", dual.gather(1, top) + match)):
            hit = top == truth[:, None]
            own = torch.where(hit.any(1), (score * hit).sum(1), torch.tensor(float("nan")))
            r = (score >= own[:, None]).sum(1)
            ranks[name] = torch.where(hit.any(1), r, ranks["dual"].clamp(min=k + 1))
        mc = json.loads((data / "annotations" / "mc_test.json").read_text())
        where = {r["video"]: i for i, r in enumerate(tests)}
        opts = embed_texts(model, [o for r in mc for o in r["caption"]], tok, s, keep_tokens=True)
        correct = {"dual": [], "dual+fusion": []}
        row = 0
        for r in mc:
            n = len(r["caption"])
            v = gallery.features.select(torch.full((n,), where[r["video"]]))
            t = opts.select(torch.arange(row, row + n))
            d = scale * (t.emb.float() @ gallery.emb.float()[where[r["video"]]])
            logits = model.score_pairs(v, t).float()
            for name, sc in (("dual", d), ("dual+fusion", d + logits[:, 1] - logits[:, 0])):
                correct[name].append(int(int(sc.argmax()) == r["answer"]))
            row += n
    bits = lambda xs: "".join(map(str, xs))  # noqa: E731
    return {"ft_train_s": round(res["train_time_s"], 1), "ft_final_losses": res["final_losses"],
            **{f"ft_r1_{n}": bits((r == 1).int().tolist()) for n, r in ranks.items()},
            **{f"ft_mc_{n}": bits(v) for n, v in correct.items()}}


def _bits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) - ord("0")


def summarise(rows: list[dict]) -> list[dict]:
    metrics = {"mc": lambda r: r["mc"]["correct"], "mc_alt": lambda r: r["mc_alt"]["correct"],
               "zs_r1": lambda r: r["r1_hits"]}
    for name in ("ft_r1_dual", "ft_r1_rerank", "ft_r1_ensemble", "ft_mc_dual", "ft_mc_dual+fusion"):
        metrics[name] = lambda r, n=name: r.get("finetune", {}).get(n, "")
    for part in ("mc", "mc_alt"):
        for kind in ("colour", "shape", "verb", "order"):
            metrics[f"{part}_pair_{kind}"] = lambda r, p=part, k=kind: r[p]["pairwise"].get(k, "")
    out = []
    for cand in CANDIDATES:
        rs = {r["seed"]: r for r in rows if r["candidate"] == cand}
        if not rs:
            continue
        entry = {"candidate": cand, "overrides": CANDIDATES[cand], "seeds": sorted(rs),
                 "steps": sorted({r["steps"] for r in rs.values()}),
                 "train_min": round(float(np.mean([r["train_s"] for r in rs.values()])) / 60, 2)}
        for name, get in metrics.items():
            hits = {s: _bits(get(r)).astype(float) for s, r in rs.items() if get(r)}
            if not hits:
                continue
            entry[name] = round(100 * float(np.mean([h.mean() for h in hits.values()])), 1)
            entry[f"{name}_per_seed"] = {s: round(100 * float(h.mean()), 1) for s, h in sorted(hits.items())}
            entry[f"{name}_ci95"] = bootstrap(hits)
            if name in ("ft_r1_rerank", "ft_r1_ensemble"):   # re-ranking against the same model's dual ranking
                dual = {s: _bits(r["finetune"]["ft_r1_dual"]).astype(float) for s, r in rs.items() if "finetune" in r}
                entry[f"{name}_minus_dual"] = paired(hits, dual)
            base = {r["seed"]: _bits(get(r)).astype(float) for r in rows if r["candidate"] == "lit" and get(r)}
            if cand != "lit" and base:
                entry[f"{name}_minus_lit"] = paired(hits, base)
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    def ci(e, k):
        return f"{e[k]:.1f} [{e[k + '_ci95'][0]:.1f}, {e[k + '_ci95'][1]:.1f}]" if k in e else "—"

    def d(e, k):
        x = e.get(f"{k}_minus_lit")
        return f"{x['mean']:+.1f} [{x['ci95'][0]:+.1f}, {x['ci95'][1]:+.1f}]" if x else "—"

    lines = ["| candidate | train min | MC (chance 20) | − lit, paired | pairwise: colour / shape / verb / order (chance 50) "
             "| MC, other phrasing | − lit, paired | zero-shot R@1 | − lit, paired | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        pw = " / ".join(f"{e.get(f'mc_pair_{k}', float('nan')):.1f}" for k in ("colour", "shape", "verb", "order"))
        lines.append(f"| {e['candidate']} | {e['train_min']:.1f} | {ci(e, 'mc')} | {d(e, 'mc')} | {pw} | {ci(e, 'mc_alt')} | "
                     f"{d(e, 'mc_alt')} | {ci(e, 'zs_r1')} | {d(e, 'zs_r1')} | {len(e['seeds'])} |")
    ft = [e for e in summary if "ft_r1_dual" in e]
    if ft:
        def vs_dual(e, k):
            x = e.get(f"{k}_minus_dual")
            return f"{x['mean']:+.1f} [{x['ci95'][0]:+.1f}, {x['ci95'][1]:+.1f}]" if x else "—"

        lines += ["", "| fine-tuned | R@1 dual | R@1 re-rank (fusion) | − dual, paired | R@1 dual + fusion | − dual, paired "
                  "| MC dual | MC dual + fusion | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for e in ft:
            lines.append(f"| {e['candidate']} | {ci(e, 'ft_r1_dual')} | {ci(e, 'ft_r1_rerank')} | {vs_dual(e, 'ft_r1_rerank')} | "
                         f"{ci(e, 'ft_r1_ensemble')} | {vs_dual(e, 'ft_r1_ensemble')} | {ci(e, 'ft_mc_dual')} | "
                         f"{ci(e, 'ft_mc_dual+fusion')} | {len(e['ft_r1_dual_per_seed'])} |")
    return "\n".join(lines)


def write(dest: Path, meta: dict, metas: list[dict], rows: list[dict]) -> None:
    from _meta import finish_meta

    RESULTS.mkdir(exist_ok=True)
    dest.write_text(json.dumps({"meta": finish_meta(dict(meta)), "meta_runs": [*metas, finish_meta(dict(meta))],
                                "protocol": __doc__, "summary": summarise(rows), "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("runs/compositional"))
    ap.add_argument("--json", type=Path, default=RESULTS / "compositional.json")
    ap.add_argument("--steps", type=int, default=STEPS, help="pre-training steps of every candidate")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune lit and lit+neg and measure re-ranking")
    ap.add_argument("--table", action="store_true", help="print the README's table from --json and stop")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.json.read_text())["summary"]))
        return
    from _meta import run_meta

    from evl.recipes import load_recipe, run_recipe

    meta = run_meta(seeds=args.seeds, precision="fp32")
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    metas = previous.get("meta_runs", [])
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "rows.jsonl"
    rows = ([json.loads(x) for x in cache.read_text().splitlines() if x.strip()] if cache.is_file()
            else list(previous.get("rows", [])))
    data = data_dir(args.work)
    ann = data / "annotations"
    for seed in args.seeds:
        for cand in args.candidates:
            if any(r["candidate"] == cand and r["seed"] == seed for r in rows):
                continue
            out = args.work / "runs" / f"{cand}-s{seed}"
            cfg = load_recipe("pretrain-tiny-lit", [
                *CANDIDATES[cand], f"data.train={ann / 'pretrain.json'}", f"data.test={ann / 'retrieval_val.json'}",
                f"data.videos={data / 'videos'}", f"train.out_dir={out}", "train.overwrite=true",
                f"train.max_steps={args.steps}", f"train.warmup_steps={max(1, round(0.1 * args.steps))}", f"train.seed={seed}",
                "train.ckpt_every=0", "train.log_every=10", "train.precision=fp32"])
            t0 = time.perf_counter()
            res = run_recipe(cfg, evaluate=False)
            row = {"candidate": cand, "seed": seed, "steps": res["steps"], "train_s": round(res["train_time_s"], 1),
                   "final_losses": res["final_losses"], **evaluate(res["checkpoint"], data),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("candidate", "seed", "train_s", "final_losses")}), flush=True)
            write(args.json, meta, metas, rows)
    ft_cache = args.work / "finetune.jsonl"   # its own append-only file: a pre-training process may still append rows
    done = [json.loads(x) for x in ft_cache.read_text().splitlines() if x.strip()] if ft_cache.is_file() else []
    for ft in done:
        for row in rows:
            if (row["candidate"], row["seed"]) == (ft["candidate"], ft["seed"]):
                row["finetune"] = ft["finetune"]
    for seed in args.seeds if args.finetune else []:
        for cand in [c for c in args.candidates if c in ("lit", "lit+neg")]:
            row = next((r for r in rows if r["candidate"] == cand and r["seed"] == seed), None)
            if row is None or "finetune" in row:
                continue
            pre = args.work / "runs" / f"{cand}-s{seed}" / "final"
            row["finetune"] = finetune(str(pre), data, args.work / "runs" / f"{cand}-s{seed}-ft", seed, cand == "lit+neg")
            with ft_cache.open("a") as f:
                f.write(json.dumps({"candidate": cand, "seed": seed, "finetune": row["finetune"]}) + "\n")
            print(json.dumps({"finetuned": cand, "seed": seed, "r1": {k: v.count("1") for k, v in row["finetune"].items()
                                                                      if k.startswith("ft_r1")}}), flush=True)
            write(args.json, meta, metas, rows)
    write(args.json, meta, metas, rows)   # also when nothing was run: the summary of every cached row
    print(markdown(summarise(rows)))


if __name__ == "__main__":
    main()
